"""How this plugin patches vLLM: one registry entry per patch, one helper to apply it.

Every patch names the exact vLLM symbol it replaces, the vLLM versions it was
written against, why it exists, the upstream issue, and when it can go. Applying
a patch is idempotent (a marker attribute on the wrapper), refuses to run on a
vLLM version it was not written for, and checks that the upstream signature
still has the parameters the wrapper relies on: a silent mismatch would make
the plugin misbehave instead of failing loudly. A patch installed here can be
removed again (:func:`remove_patch`: the front end learns ``enabled: false``
only after the plugin was loaded, see ``plugin.py``), and a step can be added
after an installed patch (:func:`run_after`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable

#: vLLM releases every patch in this package was written and tested against.
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)

#: Entries whose target and signature ``vllm-elastic-ft patches --vllm-source`` found unchanged
#: in the vLLM 0.33.0 wheel (read, not run: README "Which vLLM"). Only entries checked so
#: carry it; a new entry starts at SUPPORTED_VLLM_VERSIONS.
CHECKED_WITH_0_33 = ("0.32.0", "0.33.0")

_MARKER = "__elastic_ft_patch__"
#: Tags of the steps :func:`run_after` added to an installed wrapper.
_STEPS = "__elastic_ft_steps__"


@dataclass(frozen=True)
class _Installed:
    """What :func:`apply_patch` replaced, to put it back (:func:`remove_patch`)."""

    owner: Any
    name: str
    raw: Any  # the attribute as the owner held it (staticmethod/classmethod included)
    own: bool  # False: it was inherited, so removing the patch deletes the override


#: The patches installed in this process, by target.
_installed: dict[str, _Installed] = {}


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not one this plugin's patches were written for."""


@dataclass(frozen=True)
class PatchSpec:
    """A registry entry: what one patch replaces, and why.

    Attributes:
        target: ``module:Class.method`` of the vLLM symbol that is replaced
            (``module:function`` only for a function that its module alone
            calls, looked up at call time, so that no import by name escapes it).
        why: the behaviour of stock vLLM that the patch changes.
        how: what the replacement does.
        upstream: the upstream issue or PR that tracks the gap.
        remove_when: the condition under which the patch can be deleted.
        params: parameter names the wrapper relies on (checked on the original).
        vllm_versions: vLLM releases the patch targets.
        requires: a module the target's module imports that may be absent
            (e.g. ``deep_ep`` on CPU); without it the patch is skipped.
    """

    target: str
    why: str
    how: str
    upstream: str
    remove_when: str
    params: tuple[str, ...] = ()
    vllm_versions: tuple[str, ...] = SUPPORTED_VLLM_VERSIONS
    requires: str | None = None

    def available(self) -> bool:
        """Whether the optional module the target needs is importable here."""
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    @property
    def owner_and_name(self) -> tuple[type, str]:
        module_name, _, qualname = self.target.partition(":")
        cls_name, _, attr = qualname.rpartition(".")
        owner: Any = importlib.import_module(module_name)
        for part in filter(None, cls_name.split(".")):  # no class: a module function
            owner = getattr(owner, part)
        return owner, attr


def installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version(spec: PatchSpec, version: str | None = None) -> None:
    version = version or installed_vllm_version()
    if version not in spec.vllm_versions:
        raise UnsupportedVLLMError(
            f"vllm-elastic-ft patch for {spec.target} supports vLLM "
            f"{list(spec.vllm_versions)}, but vLLM {version} is installed. Install a "
            "supported vLLM, or leave the plugin out (VLLM_PLUGINS without 'elastic_ft'; "
            "elastic_ft.enabled=false is read only after the front end has applied the "
            "patches that read it)."
        )


def is_patched(func: Any) -> bool:
    return getattr(func, _MARKER, None) is not None


def apply_patch(
    spec: PatchSpec,
    make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]],
    *,
    kind: str = "method",
    version: str | None = None,
) -> bool:
    """Replace ``spec.target`` with ``make_wrapper(original)``.

    Args:
        spec: the registry entry.
        make_wrapper: gets the original function (``None`` when the attribute is
            only inherited from a base class that raises NotImplementedError is
            not distinguished: the original is whatever attribute lookup finds).
        kind: ``"method"``, ``"staticmethod"`` or ``"classmethod"``: how the
            replacement is installed on the class.
        version: the vLLM version to check against (tests pass one).

    Returns:
        True if the patch was installed now, False if it already was (or its
        optional dependency is absent).
    """
    if not spec.available():
        return False
    check_vllm_version(spec, version)
    owner, name = spec.owner_and_name
    raw = inspect.getattr_static(owner, name)
    original = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    if is_patched(original):
        return False
    missing = [p for p in spec.params if p not in inspect.signature(original).parameters]
    if missing:
        raise UnsupportedVLLMError(
            f"{spec.target} no longer takes {missing}; the vllm-elastic-ft patch "
            f"was written for vLLM {list(spec.vllm_versions)}."
        )
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARKER, spec)
    _installed[spec.target] = _Installed(owner, name, raw, name in vars(owner))
    if kind == "staticmethod":
        setattr(owner, name, staticmethod(wrapper))
    elif kind == "classmethod":
        setattr(owner, name, classmethod(wrapper))
    else:
        setattr(owner, name, wrapper)
    return True


def remove_patch(spec: PatchSpec) -> bool:
    """Put back what :func:`apply_patch` replaced for ``spec`` (steps added after it go too).

    Returns:
        True if the patch was removed now, False if it is not installed in this process.
    """
    record = _installed.pop(spec.target, None)
    if record is None:
        return False
    current = inspect.getattr_static(record.owner, record.name)
    current = current.__func__ if isinstance(current, (staticmethod, classmethod)) else current
    if getattr(current, _MARKER, None) != spec:
        return False  # no longer this patch there: what it replaced was put back already
    if record.own:
        setattr(record.owner, record.name, record.raw)
    else:  # inherited: attribute lookup finds the base class's again
        delattr(record.owner, record.name)
    return True


def run_after(spec: PatchSpec, step: Callable[..., None], *, tag: str) -> bool:
    """Call ``step(result, *args, **kwargs)`` after each call of the installed patch of
    ``spec`` (a plain method), once per ``tag``; it stays the same registry entry.

    For a step that belongs to another module than the patch (the plugin's, after the
    patch that reads the config). Returns True if the step was added now, False if it
    already was or the patch is not installed.
    """
    owner, name = spec.owner_and_name
    installed = inspect.getattr_static(owner, name)
    if isinstance(installed, (staticmethod, classmethod)):
        raise TypeError(f"run_after: {spec.target} is not a plain method")
    if not is_patched(installed) or tag in getattr(installed, _STEPS, ()):
        return False

    @functools.wraps(installed)  # keeps the marker: apply_patch still sees it installed
    def with_step(*args, **kwargs):
        result = installed(*args, **kwargs)
        step(result, *args, **kwargs)
        return result

    setattr(with_step, _STEPS, (*getattr(installed, _STEPS, ()), tag))
    setattr(owner, name, with_step)
    return True
