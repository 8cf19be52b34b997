"""Patches by process: which role a process has, and that it gets its role's patches only.

``vllm/process_role.py`` decides the role; ``patches.BY_ROLE`` lists each role's
patch modules; ``plugin.register`` applies them. The table below says in which
process each patched vLLM class or function runs (vLLM 0.32.0), and every
patch module must sit exactly under the roles its targets run in.
"""

from __future__ import annotations

import inspect
import multiprocessing
import sys
from types import ModuleType, SimpleNamespace

import pytest

from vllm_elastic_ft.vllm import process_role as pr

#: Where each patched vLLM symbol runs. The longest matching ``module:qualname``
#: prefix of a patch target decides.
RUNS_IN: dict[str, set[str]] = {
    # Parsed and turned into a VllmConfig by the front end only (v1/engine/async_llm.py,
    # llm_engine.py, entrypoints/*; Ray Serve LLM's replica or its config task).
    "vllm.engine.arg_utils:EngineArgs": {"api_server"},
    # The engine-liveness monitor is a thread of the process that started the engines.
    "vllm.v1.engine.utils:CoreEngineProcManager": {"api_server"},
    # The engine client (DP load balancer, utility calls) lives in the front end.
    "vllm.v1.engine.core_client:AsyncMPClient": {"api_server"},
    "vllm.v1.engine.core_client:DPLBAsyncMPClient": {"api_server"},
    # The engine core's process: its busy loop, its DP state, its death frame.
    "vllm.v1.engine.core:EngineCoreProc": {"engine_core"},
    "vllm.v1.engine.core:DPEngineCoreProc": {"engine_core"},
    # ParallelConfig is everywhere; these three are called by DPEngineCoreProc only.
    "vllm.config.parallel:ParallelConfig.sync_dp_state": {"engine_core"},
    "vllm.config.parallel:ParallelConfig.has_unfinished_dp": {"engine_core"},
    "vllm.config.parallel:ParallelConfig.stateless_init_dp_group": {"engine_core"},
    # The worker: its communicators, model runner, MoE layers, distributed set-up.
    "vllm.distributed.device_communicators.cpu_communicator:CpuCommunicator": {"worker"},
    "vllm.model_executor.layers.fused_moe": {"worker"},
    "vllm.v1.worker.dp_utils": {"worker"},
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner": {"worker"},
    "vllm.v1.worker.cpu_worker": {"worker"},
}


def _runs_in(target: str) -> set[str]:
    keys = [k for k in RUNS_IN
            if target == k or target.startswith(k + ".") or target.startswith(k + ":")]
    assert keys, f"{target}: not in RUNS_IN; say in which vLLM process it runs"
    return RUNS_IN[max(keys, key=len)]


@pytest.fixture()
def named(monkeypatch):
    """Run process_role() as if this process were named ``name``."""
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(pr, "in_ray_actor", lambda: False)
    monkeypatch.setattr(pr, "in_ray_serve_replica", lambda: False)

    def role(name: str) -> str | None:
        monkeypatch.setattr(multiprocessing, "current_process", lambda: SimpleNamespace(name=name))
        return pr.process_role()

    return role


# ---------------------------------------------------------------- the role signals

@pytest.mark.parametrize("name, role", [
    ("VllmWorker-0", "worker"),
    ("VllmWorker-3", "worker"),
    ("EngineCore_DP0", "engine_core"),
    ("EngineCore_DP12", "engine_core"),
    ("EngineCore", "engine_core"),
    ("ApiServer_1", "api_server"),
    ("APIServer_DPRank_2", "api_server"),
    ("MainProcess", "api_server"),
    ("VLLM_DP_Coordinator", None),
    ("Process-3", None),
])
def test_process_name_gives_the_role(named, name, role):
    assert named(name) == role


def test_main_process_hosting_the_engine_is_not_placed(named, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert named("MainProcess") is None
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert named("MainProcess") == "api_server"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")  # torchrun: vLLM's external_launcher
    assert named("MainProcess") is None
    assert named("VllmWorker-0") == "worker"  # a vLLM name still wins


def _fake_ray(monkeypatch, *, actor: str | None, replica: bool) -> None:
    ray = ModuleType("ray")
    ray.is_initialized = lambda: True
    ray.get_runtime_context = lambda: SimpleNamespace(get_actor_id=lambda: actor)
    serve = ModuleType("ray.serve")

    def get_replica_context():
        if not replica:
            raise RuntimeError("`serve.get_replica_context()` may only be called from within "
                               "a Ray Serve deployment.")
        return SimpleNamespace(deployment="d", replica_tag="r")

    serve.get_replica_context = get_replica_context
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", serve)


def test_ray_serve_replica_is_the_api_server(monkeypatch):
    monkeypatch.setattr(multiprocessing, "current_process",
                        lambda: SimpleNamespace(name="MainProcess"))
    _fake_ray(monkeypatch, actor="a1", replica=True)
    assert pr.in_ray_actor() and pr.in_ray_serve_replica()
    assert pr.process_role() == "api_server"
    # Its engine cores are processes that vLLM names, as under ``vllm serve``.
    monkeypatch.setattr(multiprocessing, "current_process",
                        lambda: SimpleNamespace(name="EngineCore_DP1"))
    assert pr.process_role() == "engine_core"


def test_other_ray_actors_are_not_placed_and_ray_tasks_are_front_ends(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(multiprocessing, "current_process",
                        lambda: SimpleNamespace(name="MainProcess"))
    _fake_ray(monkeypatch, actor="a1", replica=False)  # e.g. vLLM's Ray executor worker
    assert pr.process_role() is None
    _fake_ray(monkeypatch, actor=None, replica=False)  # the Ray task building an engine config
    assert pr.process_role() == "api_server"


def test_no_ray_means_no_ray_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.delitem(sys.modules, "ray.serve", raising=False)
    assert not pr.in_ray_actor() and not pr.in_ray_serve_replica()
    assert "ray" not in sys.modules


def test_the_names_are_the_ones_vllm_and_the_replacement_give():
    """If vLLM renames its processes, the role signal must follow (vLLM 0.32.0)."""
    from vllm.v1.engine.utils import CoreEngineProcManager
    from vllm.v1.executor.multiproc_executor import WorkerProc

    from vllm_elastic_ft.vllm import replacement

    assert 'name=f"VllmWorker-{rank}"' in inspect.getsource(WorkerProc.make_worker_process)
    assert pr.role_from_process_name(f"VllmWorker-{5}") == "worker"
    source = inspect.getsource(CoreEngineProcManager.__init__)
    assert 'name=f"EngineCore_DP{global_index}" if is_dp else "EngineCore"' in source
    # A replacement rank runs vLLM's engine core in a process named like vLLM's; it
    # loads the plugin before vLLM does, so it gets engine-core patches (and its
    # worker, started by vLLM's executor, worker patches).
    assert 'name=f"EngineCore_DP{rank}"' in inspect.getsource(replacement.start_engine)
    assert pr.role_from_process_name(f"EngineCore_DP{3}") == "engine_core"


def _report_role(queue) -> None:
    queue.put(pr.process_role())


@pytest.mark.parametrize("name, role", [("VllmWorker-2", "worker"),
                                        ("EngineCore_DP1", "engine_core")])
def test_a_spawned_child_knows_its_role_before_it_runs_any_code(name, role):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_report_role, args=(queue,), name=name)
    child.start()
    try:
        assert queue.get(timeout=60) == role
    finally:
        child.join(30)


# ---------------------------------------------------------------- forked children

def test_forked_children_add_their_roles(monkeypatch):
    monkeypatch.setattr(pr, "children_are_forked", lambda: True)
    assert pr.roles_here("api_server") == ("api_server", "engine_core", "worker")
    assert pr.roles_here("engine_core") == ("engine_core", "worker")
    assert pr.roles_here("worker") == ("worker",)
    monkeypatch.setattr(pr, "children_are_forked", lambda: False)
    assert pr.roles_here("api_server") == ("api_server",)


def test_children_are_forked_follows_vllm(monkeypatch):
    import vllm.platforms

    monkeypatch.setattr(pr, "in_ray_actor", lambda: False)
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    assert not pr.children_are_forked()
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    monkeypatch.setattr(vllm.platforms, "current_platform", SimpleNamespace(is_cpu=lambda: True))
    assert not pr.children_are_forked(), "vLLM spawns on CPU"
    monkeypatch.setattr(vllm.platforms, "current_platform", SimpleNamespace(is_cpu=lambda: False))
    assert pr.children_are_forked()
    monkeypatch.setattr(pr, "in_ray_actor", lambda: True)
    assert not pr.children_are_forked(), "vLLM spawns in a Ray actor"


# ---------------------------------------------------------------- register()

@pytest.fixture()
def applied(monkeypatch):
    """Record which patch modules register() applies (nothing is patched)."""
    from vllm_elastic_ft import plugin
    from vllm_elastic_ft.vllm import patches

    calls: list[str] = []
    for module in patches.ALL:
        monkeypatch.setattr(module, "apply", lambda m=module: calls.append(m.__name__))
    monkeypatch.setattr(pr, "children_are_forked", lambda: False)

    def run(role: str | None) -> list[str]:
        """register() in a fresh process of ``role``."""
        calls.clear()
        monkeypatch.setattr(plugin, "_registered", False)
        monkeypatch.setattr(pr, "process_role", lambda: role)
        plugin.register()
        return list(calls)

    run.calls = calls
    return run


@pytest.mark.parametrize("role", pr.ROLES)
def test_register_applies_only_the_role_patches(applied, role):
    from vllm_elastic_ft.vllm import patches

    assert applied(role) == [m.__name__ for m in patches.BY_ROLE[role]]


def test_register_is_once_per_process(applied):
    from vllm_elastic_ft import plugin

    first = applied("worker")
    plugin.register()
    plugin.register()
    assert applied.calls == first


def test_an_unknown_process_gets_every_patch(applied, caplog):
    from vllm_elastic_ft.vllm import patches

    with caplog.at_level("INFO", logger="vllm.elastic_ft.plugin"):
        assert applied(None) == [m.__name__ for m in patches.ALL]
    assert "applied every patch" in caplog.text


def test_a_forking_api_server_gets_its_children_patches(applied, monkeypatch):
    from vllm_elastic_ft.vllm import patches

    monkeypatch.setattr(pr, "children_are_forked", lambda: True)
    assert set(applied("api_server")) == {m.__name__ for m in patches.ALL}
    expected = {m.__name__ for m in patches.BY_ROLE["engine_core"] + patches.BY_ROLE["worker"]}
    assert set(applied("engine_core")) == expected


def test_register_logs_the_role_and_its_patches(applied, caplog):
    with caplog.at_level("DEBUG", logger="vllm.elastic_ft.plugin"):
        applied("engine_core")
    assert "roles ['engine_core']" in caplog.text
    assert "patches.engine_core.engine_sync" in caplog.text


# ---------------------------------------------------------------- the layout

def test_every_module_has_a_role_and_roles_are_the_known_ones():
    from vllm_elastic_ft.vllm import patches

    assert tuple(patches.BY_ROLE) == pr.ROLES
    in_a_role = {m for modules in patches.BY_ROLE.values() for m in modules}
    assert in_a_role == set(patches.ALL) and len(patches.ALL) == len(set(patches.ALL))
    for role, modules in patches.BY_ROLE.items():
        for module in modules:
            assert module.__name__.split(".")[-2] == role or _listed_in_several(module), (
                f"{module.__name__} is listed under {role} but lives elsewhere")


def _listed_in_several(module) -> bool:
    from vllm_elastic_ft.vllm import patches

    return sum(module in modules for modules in patches.BY_ROLE.values()) > 1


def test_no_module_mixes_roles():
    """Each module's targets run exactly in the roles that list the module."""
    from vllm_elastic_ft.vllm import patches

    wrong = []
    for module in patches.ALL:
        listed = {role for role, modules in patches.BY_ROLE.items() if module in modules}
        for spec in module.SPECS:
            if _runs_in(spec.target) != listed:
                wrong.append(f"{module.__name__}: {spec.target} runs in "
                             f"{sorted(_runs_in(spec.target))}, module listed in {sorted(listed)}")
    assert not wrong, "\n".join(wrong)


def test_engine_core_utilities_are_added_by_the_engine_core_module():
    """The admission utilities (no PatchSpec: new methods) run on the engine core."""
    from vllm_elastic_ft.vllm.patches import BY_ROLE
    from vllm_elastic_ft.vllm.patches.engine_core import replacement

    assert replacement in BY_ROLE["engine_core"]
    assert {"elastic_ft_prepare_join", "elastic_ft_admit"} <= set(vars(replacement))
    assert "DPEngineCoreProc" in inspect.getsource(replacement.apply)
