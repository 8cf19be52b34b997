"""One engine's death no longer takes the whole deployment down: the API server's side.

Stock vLLM 0.32.0 ends every engine when one exits: the API server's engine
monitor (``CoreEngineProcManager.monitor_engine_liveness``, a thread of the
process that started the engines: API server, headless launcher or Ray Serve
replica) stops at the first dead engine and shuts all of them down. With
in-engine recovery switched on in the API server (``frontend_recovery.install``)
the monitor hands a lost engine to the recovery (route around it, move its
requests) and keeps watching the others; it still shuts everything down when
no engine is left, when fewer than ``min_live_ranks`` remain, or when the
recovery is switched off. In vLLM's headless launcher (a secondary node: the
front end is on the head node, ``vllm/headless.py``) a lost engine is left to
the group and the other local engines go on, and the launcher becomes its node's
agent for replacements (``vllm/node_agent.py``). The engine core's side (no ``ENGINE_CORE_DEAD``
frame) is ``patches/engine_core/no_cascade.py``.
"""

from __future__ import annotations

from multiprocessing import connection
from typing import Any, Callable

from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm import headless, node_agent
from vllm_elastic_ft.vllm.frontend_recovery import frontend_recovery
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch

logger = get_logger(__name__)

MONITOR = PatchSpec(
    target="vllm.v1.engine.utils:CoreEngineProcManager.monitor_engine_liveness",
    why="The first engine that exits makes the API server shut down every engine.",
    how="On an engine exit, hand its DP rank to the front-end recovery and keep watching "
    "(replacement engines too); "
    "shut down (as stock) only when no tolerable group is left.",
    upstream="vllm-project/vllm#39863, #30112",
    remove_when="vLLM tolerates the loss of one DP engine.",
    params=("self",),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (MONITOR,)

# How long the monitor waits to reap an engine whose sentinel fired (it has exited).
_REAP_TIMEOUT_S = 2.0


def _rank_of(proc, index: int) -> int:
    name = getattr(proc, "name", "") or ""
    suffix = name.rsplit("_DP", 1)[-1]
    return int(suffix) if "_DP" in name and suffix.isdigit() else index


def _make_monitor(original: Callable[..., Any]) -> Callable[..., Any]:
    def monitor_engine_liveness(self) -> None:
        # A secondary node's launcher is also its node agent: it starts replacements of
        # its ranks (appended to self.processes) and so outlives its last engine.
        agent = node_agent.start_agent(self) if headless.tolerates_loss() else None
        if len(self.processes) < 2 and agent is None:
            return original(self)
        watched: dict[Any, tuple[Any, int]] = {}
        while not self.manager_stopped.is_set():
            # Re-read the list each time: a replacement engine (vllm/replacement.py)
            # is appended to it while this thread runs, and must be watched too.
            for i, p in enumerate(list(self.processes)):
                if p.sentinel not in watched:
                    watched[p.sentinel] = (p, _rank_of(p, i))
            if not watched:
                if agent is None:
                    break
                self.manager_stopped.wait(1)  # no local engine now: a replacement may come
                continue
            for sentinel in connection.wait(list(watched), timeout=1):
                proc, rank = watched.pop(sentinel)
                if self.manager_stopped.is_set():
                    continue
                _reap(proc)  # its exit code, for the log lines below
                # Asked at each death, not at start: the recovery is installed
                # once the API server knows its config, after this thread starts.
                recovery = frontend_recovery()
                if recovery is None and headless.tolerates_loss() and (watched or agent):
                    # A secondary node's launcher: the head node's group heals without
                    # this rank; the other local engines serve on, and the node agent
                    # can start its replacement here.
                    logger.warning("engine %s exited (code %s): the group goes on without it; "
                                   "%d local engine(s) left", proc.name, proc.exitcode,
                                   len(watched))
                    _forget(self, proc)
                    continue
                if recovery is None or len(watched) < recovery.min_live_ranks:
                    self.failed_proc_name = proc.name
                    if recovery is not None:
                        logger.error("engine %s exited (code %s): fewer than %d engines remain; "
                                     "shutting down", proc.name, proc.exitcode,
                                     recovery.min_live_ranks)
                    self.shutdown()
                    return
                recovery.engine_exited(rank, proc.exitcode)
                _forget(self, proc)
        self.shutdown()

    return monitor_engine_liveness


def _forget(manager, proc) -> None:
    """Drop an exited engine from the manager's list and release its process handle (the
    sentinel pipe): otherwise every lost engine keeps descriptors in this process, and a
    later engine could get its sentinel's number (issue 12: fds flat over many faults)."""
    try:
        manager.processes.remove(proc)
    except ValueError:
        pass
    _reap(proc)
    try:
        proc.close()
    except (ValueError, AttributeError) as exc:  # not a multiprocessing.Process, or not reaped
        logger.warning("engine %s: its process handle stays open (%s)",
                       getattr(proc, "name", proc), exc)


def _reap(proc) -> None:
    """Wait briefly for an engine whose sentinel fired to be reaped: the sentinel is ready
    when the child's pipe end closes, which can be a moment before the child can be reaped
    (its exit code is unknown till then, and close() refuses a process it thinks runs)."""
    try:
        proc.join(timeout=_REAP_TIMEOUT_S)
    except (AttributeError, AssertionError, ValueError):  # not a child Process, or closed
        pass


def apply() -> None:
    apply_patch(MONITOR, _make_monitor)
