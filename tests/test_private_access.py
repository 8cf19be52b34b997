"""The registry of private attributes the plugin touches (``vllm/private_access.py``).

A static scan of the package finds every private name it reads, writes, calls
or imports from another library (``x._name``, ``getattr(x, "_name")``,
``from lib import _name``, ``import lib._private``) and requires each one to be
registered: in ``private_access.ENTRIES`` (vLLM), ``THIRD_PARTY`` (torch, Ray,
stdlib) or as a patch target. Every vLLM entry must exist in the installed vLLM.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pytest

import vllm_elastic_ft
from vllm_elastic_ft.vllm import patches
from vllm_elastic_ft.vllm.vllm_source import instance_attributes
from vllm_elastic_ft.vllm.patching import PatchSpec, installed_vllm_version
from vllm_elastic_ft.vllm.private_access import (
    ACCESS_KINDS,
    ENTRIES,
    THIRD_PARTY,
    PrivateAccess,
    all_entries,
)

PACKAGE = Path(vllm_elastic_ft.__file__).resolve().parent
REPO = PACKAGE.parent
OWN_PACKAGE = PACKAGE.name
#: Attributes the plugin itself sets on vLLM objects (markers) start with this.
OWN_PREFIX = "_elastic_ft"
_ATTR_BUILTINS = {"getattr", "setattr", "hasattr", "delattr"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@dataclass(frozen=True)
class Use:
    """One place where the package touches a private name that is not its own."""

    name: str
    file: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.name}  ({self.text})"


# ---------------------------------------------------------------- our own names

def _package_sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _assigned_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    else:
        return set()
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _module_statements(tree: ast.Module) -> Iterable[ast.stmt]:
    """Module-level statements, including those under if/try (``TYPE_CHECKING``...)."""
    pending = list(tree.body)
    while pending:
        stmt = pending.pop(0)
        yield stmt
        for block in ("body", "orelse", "finalbody"):
            if isinstance(stmt, (ast.If, ast.Try)):
                pending.extend(getattr(stmt, block, []))


def own_names(trees: Iterable[ast.Module]) -> set[str]:
    """Names the package defines: defs, classes, module globals, class members and fields,
    attributes its classes' methods set on ``self``, and its module names."""
    names = {p.name.split(".")[0] for p in PACKAGE.rglob("*") if p.is_file()}
    for tree in trees:
        for stmt in _module_statements(tree):
            names |= _assigned_names(stmt)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    names |= _assigned_names(stmt)
                names |= instance_attributes(node)
    return names


# ---------------------------------------------------------------- the scan

class _Scanner(ast.NodeVisitor):
    """Collects the foreign private names one module touches.

    A private name counts as foreign unless the package defines it, or it
    starts with ``OWN_PREFIX``. ``self._x`` in a function that is no method of
    the package's classes (a patch wrapper: ``self`` is a vLLM object) is
    foreign even when the package defines a ``_x`` of its own.
    """

    def __init__(self, file: str, own: set[str]) -> None:
        self.file, self.own = file, own
        self.uses: list[Use] = []
        self._self_is_ours: list[bool] = [False]
        self._in_class: list[bool] = [False]

    def _record(self, name: str, node: ast.AST, receiver: ast.expr | None) -> None:
        if not _is_private(name) or name.startswith(OWN_PREFIX):
            return
        foreign_self = (isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")
                        and not self._self_is_ours[-1])
        if name in self.own and not foreign_self:
            return
        self.uses.append(Use(name, self.file, node.lineno, ast.unparse(node)[:80]))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._in_class.append(True)
        self.generic_visit(node)
        self._in_class.pop()

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = [a.arg for a in node.args.posonlyargs + node.args.args]
        takes_self = bool(args) and args[0] in ("self", "cls")
        if self._in_class[-1]:
            ours = True  # a method of one of our classes
        else:
            ours = self._self_is_ours[-1] and not takes_self  # a closure keeps its ``self``
        self._self_is_ours.append(ours)
        self._in_class.append(False)
        self.generic_visit(node)
        self._in_class.pop()
        self._self_is_ours.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._record(node.attr, node, node.value)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (isinstance(node.func, ast.Name) and node.func.id in _ATTR_BUILTINS
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            self._record(node.args[1].value, node, node.args[0])
        self.generic_visit(node)

    def _module_path(self, module: str, node: ast.AST) -> None:
        if module.split(".")[0] == OWN_PACKAGE:
            return
        for part in module.split("."):
            if _is_private(part):
                self.uses.append(Use(part, self.file, node.lineno, f"module {module}"))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._module_path(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or (node.module or "").split(".")[0] == OWN_PACKAGE:
            return
        self._module_path(node.module or "", node)
        for alias in node.names:
            if _is_private(alias.name):
                self.uses.append(Use(alias.name, self.file, node.lineno,
                                     f"from {node.module} import {alias.name}"))


def scan(sources: dict[str, ast.Module], own: set[str]) -> list[Use]:
    """Every foreign private name used in ``sources`` (file -> parsed module)."""
    uses: list[Use] = []
    for file, tree in sources.items():
        scanner = _Scanner(file, own)
        scanner.visit(tree)
        uses += scanner.uses
    return uses


def _target_names(target: str) -> set[str]:
    """The private components of ``module:qualname`` (module parts, classes, attribute)."""
    return {part for part in re.split(r"[.:]", target) if _is_private(part)}


def _registered() -> dict[str, list[PatchSpec | PrivateAccess]]:
    """private name -> the registry entries whose target contains it."""
    by_name: dict[str, list[PatchSpec | PrivateAccess]] = {}
    for entry in all_entries() + THIRD_PARTY:
        for name in _target_names(entry.target):
            by_name.setdefault(name, []).append(entry)
    return by_name


@pytest.fixture(scope="module")
def uses() -> list[Use]:
    sources = _package_sources()
    return scan(sources, own_names(sources.values()))


# ---------------------------------------------------------------- (a) the scan's verdicts

def test_every_foreign_private_name_is_registered(uses):
    registered = _registered()
    unregistered = [str(u) for u in uses if u.name not in registered]
    assert not unregistered, (
        "private names of vLLM/other libraries used outside the registry; add a "
        "PrivateAccess to private_access.ENTRIES (vLLM) or THIRD_PARTY:\n  "
        + "\n  ".join(unregistered))


def test_used_in_names_every_file_that_uses_the_name(uses):
    registered = _registered()
    wrong = []
    for use in uses:
        entries = registered.get(use.name, [])
        if any(isinstance(e, PatchSpec) for e in entries):
            continue  # a patch target: its own module references it
        files = {f for e in entries for f in e.files}
        if entries and use.file not in files:
            wrong.append(f"{use}  (used_in: {sorted(files)})")
    assert not wrong, "add these files to the entries' used_in:\n  " + "\n  ".join(wrong)


def test_no_stale_entries(uses):
    used = {(u.file, u.name) for u in uses}
    stale = []
    for entry in ENTRIES + THIRD_PARTY:
        for file in entry.files:
            if not any((file, name) in used for name in _target_names(entry.target)):
                stale.append(f"{entry.target}: not used in {file}")
    assert not stale, "registry entries that the code no longer needs:\n  " + "\n  ".join(stale)


_SAMPLE = '''
from vllm.x import _hidden, public
from vllm_elastic_ft.comm import _ours_too
import vllm._private_mod
from ray._priv.y import Thing

class Ours(Base):
    def __init__(self):
        self._mine = 1

    def method(self, engine):
        engine._engine_thing()
        getattr(engine, "_via_getattr", None)
        self._inherited_from_base()
        engine._elastic_ft_marker = True
        return self._mine, engine._mine_too

def _make_wrapper(original):
    def method(self, x):
        self._vllm_state = x
        return self._mine
    return method
'''


def test_scanner_finds_each_kind_of_access():
    tree = ast.parse(textwrap.dedent(_SAMPLE))
    own = own_names([tree]) | {"_ours_too", "_mine_too"}
    found = {u.name for u in scan({"sample.py": tree}, own)}
    assert found == {
        "_hidden", "_private_mod", "_priv", "_engine_thing", "_via_getattr",
        "_inherited_from_base", "_vllm_state",
        "_mine",  # ``self`` of a free function is a vLLM object, not Ours
    }


# ---------------------------------------------------------------- the registry itself

def test_entries_are_well_formed():
    for entry in ENTRIES + THIRD_PARTY:
        assert entry.access in ACCESS_KINDS and entry.why, entry.target
        assert entry.files, entry.target
        for file in entry.files:
            assert (REPO / file).is_file(), f"{entry.target}: used_in {file} does not exist"
    targets = [e.target for e in ENTRIES + THIRD_PARTY]
    assert len(targets) == len(set(targets)), "duplicate targets"
    assert all(e.module.split(".")[0] == "vllm" for e in ENTRIES)
    assert not any(e.module.split(".")[0] == "vllm" for e in THIRD_PARTY)


def test_all_entries_lists_patches_then_private_accesses():
    specs = tuple(spec for module in patches.ALL for spec in module.SPECS)
    assert all_entries() == specs + ENTRIES


def test_invalid_access_is_refused():
    with pytest.raises(ValueError, match="access"):
        PrivateAccess(target="vllm.x:_y", access="poke", why="w", used_in="f.py")


# ---------------------------------------------------------------- (b) vLLM has them

def _class_sets_attribute(cls: type, attr: str) -> bool:
    """``self.<attr> = ...`` in a method of ``cls`` or of a class in its MRO."""
    for klass in inspect.getmro(cls):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue  # builtins, C extensions
        node = ast.parse(source).body[0]
        if isinstance(node, ast.ClassDef) and attr in instance_attributes(node):
            return True
    return False


def _exists_in_installed(target: str) -> bool:
    module_name, _, qualname = target.partition(":")
    owner: object = importlib.import_module(module_name)
    *classes, attr = qualname.split(".")
    for name in classes:
        owner = getattr(owner, name)
    try:
        inspect.getattr_static(owner, attr)
        return True
    except AttributeError:
        return isinstance(owner, type) and _class_sets_attribute(owner, attr)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.target)
def test_vllm_entry_exists_in_installed_vllm(entry):
    assert _exists_in_installed(entry.target), f"{entry.target} not in the installed vLLM"
    assert installed_vllm_version() in entry.vllm_versions
