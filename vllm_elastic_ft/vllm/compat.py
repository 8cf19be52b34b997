"""Whether the plugin's vLLM dependencies still hold in a given vLLM: ``vllm-elastic-ft patches``.

Every patch (``patching.PatchSpec``) and every private access
(``private_access.PrivateAccess``) names a vLLM symbol. This module looks each
one up in a vLLM source tree by *parsing* it (``ast``; nothing of that vLLM is
imported, so any release can be checked from its unpacked wheel or a git
checkout) and reports, per entry:

* whether the module, the class and the member exist (a member may be a method,
  a class attribute, an attribute assigned as ``self._x = ...`` in any method,
  or any of these on a base class: bases are followed into other vLLM modules
  where their import can be resolved);
* for a function or method: whether it still takes the parameters a patch
  relies on, and whether its full parameter list is unchanged from the
  installed vLLM (the baseline the plugin was written against);
* the version of that vLLM, and whether the entry was written for it.

The report is a table, or JSON with ``--json``; the exit status is 0 when every
entry exists and matches. Reading the tree is ``vllm_source.py``'s job.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_elastic_ft.vllm.patching import PatchSpec
from vllm_elastic_ft.vllm.private_access import PrivateAccess, all_entries
from vllm_elastic_ft.vllm.vllm_source import (
    FunctionNode, Resolution, Resolver, SourceTree, body_digest, find_package_dir,
    parameter_names, parameters, read_version, signature, signature_diff,
)

__all__ = ["CompatReport", "EntryReport", "build_report", "check_entry", "find_package_dir",
           "format_table", "read_version", "run_report", "signature", "signature_diff"]


# ---------------------------------------------------------------- the report

Entry = PatchSpec | PrivateAccess


@dataclass
class EntryReport:
    """The verdict on one registry entry in one vLLM tree.

    Attributes:
        target, kind, access: the entry (``kind`` is ``patch`` or ``private``;
            ``access`` is ``replace`` for a patch).
        exists, module_found, class_found, member_found, found_in, detail:
            see ``Resolution``; ``baseline_found_in``: ``found_in`` in the
            installed vLLM (the two differ when the definition moved).
        params: the parameters a patch relies on; ``missing_params`` those gone.
        params_ok: all of ``params`` are there (None: not a patch, or not found).
        signature: ``signature()`` of the function found (None: not a function).
        baseline_signature: the same in the installed vLLM.
        signature_change: ``unchanged``, ``changed: ...`` or ``n/a ...``.
        body: ``same`` / ``differs`` from the installed vLLM's (informational:
            a patch that re-implements the function may need the change).
        vllm_versions: the entry's supported versions; ``version_supported``:
            the tree's version is one of them.
    """

    target: str
    kind: str
    access: str
    exists: bool
    module_found: bool
    class_found: bool | None
    member_found: bool
    found_in: str
    detail: str
    baseline_found_in: str = ""
    params: list[str] = field(default_factory=list)
    missing_params: list[str] = field(default_factory=list)
    params_ok: bool | None = None
    signature: list[str] | None = None
    baseline_signature: list[str] | None = None
    signature_change: str = "n/a"
    body: str = "n/a"
    vllm_versions: list[str] = field(default_factory=list)
    version_supported: bool = False

    @property
    def ok(self) -> bool:
        """Exists, keeps the parameters a patch needs, and its signature did not change."""
        return (self.exists and self.params_ok is not False
                and not self.signature_change.startswith("changed"))

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _compare(current: FunctionNode | None, baseline: FunctionNode | None,
             has_baseline: bool) -> tuple[str, str]:
    """(signature change, body same/differs) of ``current`` against ``baseline``."""
    if current is None:
        return "n/a", "n/a"
    if baseline is None:
        why = "n/a (not in baseline)" if has_baseline else "n/a (no installed vLLM)"
        return why, "n/a"
    body = "same" if body_digest(current) == body_digest(baseline) else "differs"
    return signature_diff(signature(baseline), signature(current)), body


def _params_check(entry: Entry, found: Resolution) -> tuple[list[str], bool | None]:
    """(missing parameters, params_ok) for a patch; ([], None) otherwise."""
    if not isinstance(entry, PatchSpec) or not found.exists:
        return [], None
    names = parameter_names(parameters(found.function)) if found.function else []
    missing = [p for p in entry.params if p not in names]
    return missing, found.function is not None and not missing


def check_entry(entry: Entry, resolver: Resolver, baseline: Resolver | None) -> EntryReport:
    """Resolve one entry in ``resolver``'s tree, compared with ``baseline``'s."""
    found = resolver.resolve(entry.target)
    base = baseline.resolve(entry.target) if baseline is not None else Resolution()
    base_fn = base.function
    change, body = _compare(found.function, base_fn, baseline is not None)
    missing, params_ok = _params_check(entry, found)
    is_patch = isinstance(entry, PatchSpec)
    return EntryReport(
        target=entry.target, kind="patch" if is_patch else "private",
        access="replace" if is_patch else entry.access, exists=found.exists,
        module_found=found.module_found, class_found=found.class_found,
        member_found=found.member_found, found_in=found.found_in, detail=found.detail,
        baseline_found_in=base.found_in,
        params=list(entry.params) if is_patch else [], missing_params=missing,
        params_ok=params_ok,
        signature=signature(found.function) if found.function else None,
        baseline_signature=signature(base_fn) if base_fn else None,
        signature_change=change, body=body, vllm_versions=list(entry.vllm_versions),
        version_supported=resolver.tree.version in entry.vllm_versions,
    )


@dataclass
class CompatReport:
    """Every entry's verdict against one vLLM tree."""

    vllm_dir: str
    vllm_version: str
    baseline_dir: str | None
    baseline_version: str | None
    entries: list[EntryReport]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries)

    def to_json(self) -> dict:
        return {"vllm_dir": self.vllm_dir, "vllm_version": self.vllm_version,
                "baseline_dir": self.baseline_dir, "baseline_version": self.baseline_version,
                "ok": self.ok, "entries": [e.to_json() for e in self.entries]}


def _baseline_tree(tree: SourceTree) -> SourceTree | None:
    """The installed vLLM (``tree`` itself when that is it), or None if none is installed."""
    try:
        installed = find_package_dir(None)
    except FileNotFoundError:
        return None
    return tree if installed.resolve() == tree.package_dir.resolve() else SourceTree(installed)


def build_report(source: str | Path | None = None,
                 entries: tuple[Entry, ...] | None = None) -> CompatReport:
    """Check ``entries`` (default: ``all_entries()``) against the vLLM at ``source``.

    Args:
        source: see ``find_package_dir``; None: the installed vLLM.
        entries: the registry entries to check.
    """
    tree = SourceTree(find_package_dir(source))
    baseline = _baseline_tree(tree)
    resolver = Resolver(tree)
    base_resolver = Resolver(baseline) if baseline is not None else None
    reports = [check_entry(e, resolver, base_resolver) for e in (entries or all_entries())]
    return CompatReport(str(tree.package_dir), tree.version,
                        str(baseline.package_dir) if baseline else None,
                        baseline.version if baseline else None, reports)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def format_table(report: CompatReport) -> str:
    """The human-readable report: one row per entry, then what is wrong."""
    header = ("OK", "KIND", "ACCESS", "EXISTS", "PARAMS", "SIGNATURE", "BODY", "VERSION",
              "TARGET")
    rows = [header] + [(
        "ok" if e.ok else "FAIL", e.kind, e.access, _yes_no(e.exists), _yes_no(e.params_ok),
        e.signature_change.split(":")[0].split(" (")[0], e.body, _yes_no(e.version_supported),
        e.target,
    ) for e in report.entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [f"vLLM {report.vllm_version} at {report.vllm_dir}",
             f"baseline: vLLM {report.baseline_version} at {report.baseline_dir}", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    problems = [(e.target, e.detail or (f"missing parameters {e.missing_params}"
                                        if e.missing_params else e.signature_change))
                for e in report.entries if not e.ok]
    if problems:
        lines += ["", "problems:"] + [f"  {t}: {why}" for t, why in problems]
    moved = [e for e in report.entries
             if e.found_in and e.baseline_found_in and e.found_in != e.baseline_found_in]
    if moved:
        lines += ["", "moved (still reachable from the target):"] + [
            f"  {e.target}: now {e.found_in} (was {e.baseline_found_in})" for e in moved]
    good = sum(e.ok for e in report.entries)
    supported = sum(e.version_supported for e in report.entries)
    lines += ["", f"{good} of {len(report.entries)} entries exist and match; "
              f"{supported} list vLLM {report.vllm_version} in vllm_versions."]
    return "\n".join(lines)


def run_report(source: str | Path | None = None, as_json: bool = False) -> int:
    """Print the report for the vLLM at ``source``; 0 if every entry exists and matches."""
    try:
        report = build_report(source)
    except FileNotFoundError as e:
        print(f"vllm-elastic-ft patches: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if as_json else format_table(report))
    return 0 if report.ok else 1
