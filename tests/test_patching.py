"""The patch registry and the patch helper (idempotence, version and signature checks,
removal, a step after a patch)."""

import importlib
import inspect
import pkgutil

import pytest

from vllm_elastic_ft.vllm import patches
from vllm_elastic_ft.vllm.patching import (
    PatchSpec,
    UnsupportedVLLMError,
    apply_patch,
    installed_vllm_version,
    is_patched,
    remove_patch,
    run_after,
)


def _modules_on_disk() -> set[str]:
    """Every module file under vllm/patches, as a dotted name (subpackages not counted)."""
    found = set()
    for info in pkgutil.walk_packages(patches.__path__, patches.__name__ + "."):
        if not info.ispkg:
            found.add(info.name)
    return found


def test_every_patch_module_is_registered_and_documented():
    listed = {m.__name__ for m in patches.ALL}
    assert listed == _modules_on_disk(), "every file in vllm/patches must be listed in patches.ALL"
    assert len(listed) == len(patches.ALL), "patches.ALL lists a module twice"
    top_level = {m.name for m in pkgutil.iter_modules(patches.__path__) if not m.ispkg}
    assert not top_level, f"patch modules belong in a role's subpackage: {sorted(top_level)}"
    for role, modules in patches.BY_ROLE.items():
        package = importlib.import_module(f"{patches.__name__}.{role}")
        assert modules == package.MODULES
        on_disk = {m.name for m in pkgutil.iter_modules(package.__path__)}
        assert {m.__name__.rsplit(".", 1)[1] for m in modules} == on_disk, (
            f"every file in vllm/patches/{role} must be listed in its MODULES")
    for module in patches.ALL:
        assert module.SPECS, module.__name__
        for spec in module.SPECS:
            assert spec.why and spec.how and spec.upstream and spec.remove_when
            if not spec.available():
                continue  # e.g. deep_ep on a CPU machine: resolved on GPU only
            # The target exists in the installed vLLM and takes the parameters we rely on.
            owner, name = spec.owner_and_name
            original = inspect.getattr_static(owner, name)
            original = getattr(original, "__func__", original)
            assert set(spec.params) <= set(inspect.signature(original).parameters)


def test_supported_version_is_installed():
    for module in patches.ALL:
        for spec in module.SPECS:
            assert installed_vllm_version() in spec.vllm_versions


class Target:
    def method(self, x, y=1):
        return ("original", x, y)


def _spec(**kw) -> PatchSpec:
    return PatchSpec(
        target=f"{__name__}:Target.method", why="w", how="h", upstream="u",
        remove_when="r", **kw,
    )


def test_apply_patch_wraps_once_and_keeps_metadata(monkeypatch):
    monkeypatch.setattr(Target, "method", Target.__dict__["method"])
    calls = []

    def make_wrapper(original):
        def method(self, x, y=1):
            calls.append(x)
            return ("patched",) + original(self, x, y)[1:]

        return method

    spec = _spec(params=("self", "x"))
    assert apply_patch(spec, make_wrapper, version=spec.vllm_versions[0]) is True
    assert apply_patch(spec, make_wrapper, version=spec.vllm_versions[0]) is False
    assert Target().method(3) == ("patched", 3, 1)
    assert calls == [3], "applied twice would call the wrapper twice"
    assert is_patched(Target.method) and Target.method.__name__ == "method"


def test_unsupported_version_fails_loudly():
    with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM \['0.32.0'\], but vLLM 0.99.0"):
        apply_patch(_spec(), lambda original: original, version="0.99.0")


def test_changed_signature_fails_loudly(monkeypatch):
    monkeypatch.setattr(Target, "method", Target.__dict__["method"])
    spec = _spec(params=("self", "x", "gone"))
    with pytest.raises(UnsupportedVLLMError, match=r"no longer takes \['gone'\]"):
        apply_patch(spec, lambda original: original, version=spec.vllm_versions[0])
    assert not is_patched(Target.method)


class Base:
    def method(self, x, y=1):
        return ("base", x, y)


class Derived(Base):
    pass


def _patch_that_marks(original):
    def method(self, x, y=1):
        return ("patched",) + original(self, x, y)[1:]

    return method


def test_remove_patch_puts_back_exactly_what_was_there(monkeypatch):
    monkeypatch.setattr(Target, "method", Target.__dict__["method"])
    own = Target.__dict__["method"]
    spec = _spec(params=("self", "x"))
    version = spec.vllm_versions[0]
    assert remove_patch(spec) is False, "not installed: nothing to remove"
    apply_patch(spec, _patch_that_marks, version=version)
    assert Target().method(2) == ("patched", 2, 1)
    assert remove_patch(spec) is True and remove_patch(spec) is False
    assert Target.__dict__["method"] is own and Target().method(2) == ("original", 2, 1)
    # Removed, it can be applied again (the marker went with the wrapper).
    assert apply_patch(spec, _patch_that_marks, version=version) is True
    assert remove_patch(spec) and Target.__dict__["method"] is own

    inherited = PatchSpec(target=f"{__name__}:Derived.method", why="w", how="h", upstream="u",
                          remove_when="r")
    apply_patch(inherited, _patch_that_marks, version=version)
    assert "method" in vars(Derived) and Derived().method(1)[0] == "patched"
    assert remove_patch(inherited)
    assert "method" not in vars(Derived), "an inherited attribute is not copied onto the class"
    assert Derived.method is Base.method


def test_run_after_adds_one_step_after_the_installed_patch(monkeypatch):
    monkeypatch.setattr(Target, "method", Target.__dict__["method"])
    spec = _spec(params=("self", "x"))
    version = spec.vllm_versions[0]
    steps = []

    def step(result, self, x, y=1):
        steps.append((result, x))

    assert run_after(spec, step, tag="t") is False, "no patch installed: nothing to follow"
    apply_patch(spec, _patch_that_marks, version=version)
    assert run_after(spec, step, tag="t") is True and run_after(spec, step, tag="t") is False
    assert Target().method(4) == ("patched", 4, 1)
    assert steps == [(("patched", 4, 1), 4)], "once per tag, after the patch, with its result"
    assert is_patched(Target.method)
    assert apply_patch(spec, _patch_that_marks, version=version) is False, "still installed"
    assert remove_patch(spec) and Target().method(4) == ("original", 4, 1)
    assert len(steps) == 1, "the step goes with the patch"


def test_plugin_register_is_idempotent(monkeypatch):
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    from vllm_elastic_ft import plugin
    from vllm_elastic_ft.vllm import process_role

    monkeypatch.setattr(process_role, "process_role", lambda: "worker")
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()
    first = CpuCommunicator.__dict__["all_gatherv"]
    plugin.register()
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()  # even past the plugin's own guard, a patch is applied once
    assert CpuCommunicator.__dict__["all_gatherv"] is first and is_patched(first)
