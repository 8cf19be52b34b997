"""Which vLLM process this is: the API server, an engine core, or a worker.

vLLM 0.32 calls the ``vllm.general_plugins`` entry point (``plugin.register``)
once in every process of a deployment, at the first of
``AsyncEngineArgs.add_cli_args`` (``engine/arg_utils.py:3202``, the CLI
parser of ``vllm serve``), ``EngineArgs.__post_init__`` (``arg_utils.py:906``,
wherever engine arguments are built: API server, Ray Serve replica, offline
``LLM``), ``EngineCore.__init__`` (``v1/engine/core.py:129``) and
``WorkerWrapperBase.init_worker`` (``v1/worker/worker_base.py:276``). The call
carries no argument, so the role is read from the process itself:

* **the multiprocessing process name**, which vLLM gives each process it
  starts, in the parent, before the child runs any code (spawn sends it with
  the preparation data, fork keeps the ``Process`` object):
  ``VllmWorker-<rank>`` (``MultiprocExecutor``'s workers,
  ``v1/executor/multiproc_executor.py:747``, the CPU executor's too),
  ``EngineCore_DP<n>`` or ``EngineCore`` (``CoreEngineProcManager``,
  ``v1/engine/utils.py:284``; ``vllm/replacement.py`` names a replacement
  rank's engine the same), ``ApiServer_<i>`` (``--api-server-count``,
  ``v1/utils.py:250``) and ``APIServer_DPRank_<n>`` (the DP supervisor,
  ``entrypoints/launchers/dp_supervisor.py:405``). The setproctitle titles
  (``VLLM::EngineCore_DP0``, ``VLLM::Worker_DP0...``) are no use: a worker sets
  its title after ``init_worker`` loaded the plugins
  (``multiproc_executor.py:1074``), a replacement engine loads them before
  ``run_engine_core`` sets one, and without the setproctitle package there is
  none;
* **a Ray Serve replica** (``ray.serve.get_replica_context()`` answers): the
  front end of a Ray Serve LLM deployment, which builds the engine arguments
  and runs ``AsyncLLM`` in-process, spawning its engine-core processes (named
  as above). Any other Ray actor (a worker of vLLM's Ray executor, an engine
  core of the Ray DP backend) is not placed;
* **the main process** (``MainProcess``) is the API server (``vllm serve``,
  ``python -m vllm.entrypoints.openai.api_server``, a headless launcher, an
  offline ``LLM``, the Ray task that builds a Ray Serve engine config), unless
  the engine core and worker run inside it: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  or a torchrun launch (vLLM's ``external_launcher``).

Any other process is not placed: :func:`process_role` returns None and the
plugin applies every patch there, as it did before patches had roles.

A child process started with ``fork`` inherits its parent's patches and vLLM's
"plugins loaded" flag, so vLLM never calls ``register`` in it:
:func:`roles_here` then adds the roles of the processes this one starts.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

API_SERVER = "api_server"
ENGINE_CORE = "engine_core"
WORKER = "worker"
ROLES = (API_SERVER, ENGINE_CORE, WORKER)

#: The roles of the processes that a process of each role starts.
CHILDREN = {API_SERVER: (ENGINE_CORE,), ENGINE_CORE: (WORKER,), WORKER: ()}

#: Set by torchrun in every process it starts (vLLM's ``external_launcher`` runs
#: the engine core and the worker in that process).
_TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"


def role_from_process_name(name: str) -> str | None:
    """The role of a process that vLLM started and named ``name``; None if not one."""
    if name.startswith("VllmWorker-"):
        return WORKER
    if name == "EngineCore" or name.startswith("EngineCore_DP"):
        return ENGINE_CORE
    if name.startswith(("ApiServer_", "APIServer_")):
        return API_SERVER
    return None


def in_ray_actor() -> bool:
    """Whether this process is a Ray actor (never imports Ray)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:  # a partial Ray install, an old Ray
        return False


def in_ray_serve_replica() -> bool:
    """Whether this process is a Ray Serve replica (never imports Ray Serve)."""
    serve = sys.modules.get("ray.serve")
    if serve is None:
        return False
    try:
        serve.get_replica_context()  # RayServeException outside a replica
    except Exception:
        return False
    return True


def _in_process_engine() -> bool:
    """The engine core (and its worker) run inside the main process."""
    return (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").strip() == "0"
            or _TORCHRUN_ENV in os.environ)


def process_role() -> str | None:
    """``"api_server"``, ``"engine_core"`` or ``"worker"``; None for a process that is
    none of them for sure (the plugin then applies every patch)."""
    name = multiprocessing.current_process().name
    role = role_from_process_name(name)
    if role is not None:
        return role
    if in_ray_serve_replica():
        return API_SERVER
    if in_ray_actor():
        return None
    if name == "MainProcess" and not _in_process_engine():
        return API_SERVER
    return None


def children_are_forked() -> bool:
    """Whether the processes this one starts will be forked (and so inherit its patches).

    vLLM starts engine cores and workers with ``VLLM_WORKER_MULTIPROC_METHOD``
    (default ``fork``; ``vllm serve`` sets ``spawn`` before it parses its
    arguments), but always spawns in a Ray actor (``utils/system_utils.py``,
    ``_maybe_force_spawn``) and on the CPU platform (``platforms/cpu.py:409``,
    set while the engine config is built, before any engine starts).
    """
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "fork") != "fork" or in_ray_actor():
        return False
    try:
        from vllm.platforms import current_platform

        return not current_platform.is_cpu()
    except Exception:  # no platform resolvable: assume the children inherit
        return True


def roles_here(role: str) -> tuple[str, ...]:
    """``role`` and, when this process forks its children, theirs (and so on down)."""
    roles = [role]
    if children_are_forked():
        for parent in roles:
            roles.extend(r for r in CHILDREN[parent] if r not in roles)
    return tuple(roles)
