"""Replacing a lost DP rank on the node that lost it (issue 13).

On one host the API server starts a replacement engine itself
(``replacement.launch_engine``). Across nodes the lost rank's node must start
it: its GPUs, its share of the ranks. There, vLLM's headless launcher
(``vllm serve --headless``) already started the node's engines and watches them;
this module makes it the node's agent for replacements too:

* **head side** (:func:`start_remote`, called by ``FrontEndRecovery.replace``):
  the front end posts a start request for rank ``k`` in the group's store with
  the ZMQ addresses of its DP client and DP coordinator, then waits for the
  node's answer (the new engine's pid, once it is loaded and warm, or the error);
* **process gone** (:class:`GoneMarker`, run by the agent): it probes its own
  ranks' processes in its node's ``/proc`` and marks the heartbeat of one that
  exited ``gone``; peers on other nodes, which cannot probe it, name it dead at
  their next beat instead of when its heartbeat goes stale;
* **node side** (:class:`NodeAgent`, a thread of the headless launcher): it
  polls the store for requests for its own ranks, starts the engine with
  ``replacement.start_engine`` — the launcher plays the front end's part of
  vLLM's start-up handshake over a local socket, with the head's addresses —
  and appends it to vLLM's engine manager, whose monitor then watches it and
  whose shutdown stops it.

The store is the only channel: it listens on the head node's DP address, and
every key lives under the deployment's secret, so nobody without it can start
an engine. The admission itself is the front end's, exactly as for a local
replacement. Targets vLLM 0.32.0 (``EngineZmqAddresses``, ``CoreEngineProcManager``).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from typing import Any

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group.fencing import current_epoch
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.watchdog.attribution import RankStatus, probe_process, this_host

logger = get_logger(__name__)

#: How often a node agent looks for start requests for its ranks.
POLL_INTERVAL_S = 0.2
#: How often a node agent looks for its ranks' exited processes (a store read of the
#: epoch, its members and this node's heartbeats; the peers read it at their next beat).
GONE_CHECK_S = 0.05
#: How long a node agent lets a stale engine leave by itself before killing it: once a
#: cut-off node's link is back, its engines meet their fence, refuse to talk at their old
#: epoch and exit within seconds (the refusal is the partition's evidence in the logs).
STALE_LEAVE_S = 10.0
#: How long a node agent waits for a stale engine it killed to exit.
STALE_STOP_TIMEOUT_S = 10.0


def local_ranks(parallel_config) -> range:
    """The DP ranks a process's engine manager starts (vLLM's ``data_parallel_rank`` is the
    first of them on a multi-node deployment's head or headless node)."""
    start = parallel_config.data_parallel_rank
    return range(start, start + parallel_config.data_parallel_size_local)


# ------------------------------------------------------------------ head side
def start_remote(store, group: str, rank: int, addresses, timeout_s: float) -> dict:
    """Ask the node agent of DP ``rank`` to start its replacement engine, connected to the
    front end at ``addresses`` (vLLM's ``EngineZmqAddresses``); returns the agent's answer
    (``pid``, ``node``) once the engine is loaded and warm.

    Blocking. Raises RuntimeError (no agent for the rank, or the start failed on its
    node) or TimeoutError (no answer within ``timeout_s``; the request is withdrawn).
    """
    if not store.check([keys.node_agent(group, rank)]):
        raise RuntimeError(f"no node agent serves DP rank {rank}: its node must run vLLM's "
                           "headless launcher with vllm-elastic-ft's in-engine rebuild on")
    request_id = uuid.uuid4().hex[:12]
    answer_key = keys.replace_answer(group, rank, request_id)
    store.set(keys.replace_request(group, rank),
              json.dumps({"id": request_id, "addresses": dataclasses.asdict(addresses)}))
    deadline = time.monotonic() + timeout_s
    while not store.check([answer_key]):
        if time.monotonic() > deadline:
            # Withdrawn: an agent that starts it late stops it again (see NodeAgent).
            store.set(keys.replace_request(group, rank), json.dumps({"cancel": request_id}))
            raise TimeoutError(f"DP rank {rank}'s node did not start its replacement within "
                               f"{timeout_s:.0f}s")
        time.sleep(POLL_INTERVAL_S)
    answer = json.loads(store.get(answer_key))
    store.delete_key(answer_key)
    if "error" in answer:
        raise RuntimeError(f"DP rank {rank}'s node could not start it: {answer['error']}")
    return answer


def withdraw(store, group: str, rank: int, pid: int) -> None:
    """The replacement of DP ``rank`` (engine ``pid`` on its node) was not admitted: its node
    agent stops it (never leave a half-joined engine behind)."""
    store.set(keys.replace_request(group, rank), json.dumps({"stop_pid": pid}))


# ------------------------------------------------------------------ node side
class GoneMarker:
    """Marks the heartbeat of each of this node's ranks whose process exited ``gone``.

    Peers on other nodes cannot probe a rank's pid; without this they learn of its death
    only when its heartbeat goes stale (``heartbeat_stale_s``). Runs in the process that
    started the node's engines: a headless launcher (inside its :class:`NodeAgent`) or,
    on a multi-node deployment's head, the API server (:func:`watch_head_ranks`).

    Args:
        ranks: the DP ranks (stable ids) this node runs.
        world: the group's DP size (the members of epoch 0).
        interval_s: how often it looks.
    """

    def __init__(self, store, group: str, ranks: range, world: int,
                 interval_s: float = GONE_CHECK_S):
        self.store, self.group, self.ranks, self.world = store, group, ranks, world
        self.interval_s = interval_s
        self.node = this_host()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="elastic-ft-node-liveness")

    def start(self) -> GoneMarker:
        self._thread.start()
        logger.info("node %s: exits of DP ranks %s are published every %.2fs", self.node,
                    list(self.ranks), self.interval_s)
        return self

    def stop(self) -> None:
        self._stopped.set()

    def mark_gone_ranks(self) -> list[int]:
        """Mark each of this node's ranks whose process has exited; returns them.

        Only a status written from this node (its host and PID namespace) is judged, by
        this node's ``/proc``; a rank of the current epoch's members only."""
        epoch = current_epoch(self.store, self.group)
        membership = epochs.published(self.store, self.group, epoch)
        members = (membership.members if membership is not None
                   else tuple(range(self.world)))
        mine = [(r, members.index(r)) for r in self.ranks if r in members]
        heartbeat_keys = [keys.heartbeat(self.group, epoch, g) for _, g in mine]
        present = [(r, k) for (r, _), k in zip(mine, heartbeat_keys) if self.store.check([k])]
        if not present:
            return []
        gone = []
        for (rank, key), raw in zip(present, self.store.multi_get([k for _, k in present])):
            try:
                status = RankStatus.decode(raw)
            except ValueError:
                continue  # the peers judge a bad value by staleness
            if status.state != "running" or status.host != self.node:
                continue
            if probe_process(status.pid) == "gone":
                self.store.set(key, dataclasses.replace(status, state="gone").encode())
                logger.warning("node %s: DP rank %d's process %d exited (epoch %d): "
                               "marked gone for its peers", self.node, rank, status.pid, epoch)
                gone.append(rank)
        return gone

    def _run(self) -> None:
        failing = None  # the last error's text: logged when it changes, not every check
        while not self._stopped.wait(self.interval_s):
            try:
                self.mark_gone_ranks()
                failing = None
            except Exception as err:  # noqa: BLE001 - e.g. the store unreachable (a partition)
                if str(err) != failing:
                    logger.warning("node %s: cannot check its ranks' processes (%s: %s); "
                                   "trying again every %.2fs", self.node, type(err).__name__, err,
                                   self.interval_s)
                    failing = str(err)


class NodeAgent:
    """A headless launcher's thread that starts replacements of its own DP ranks.

    Args:
        store: the group's store (on the head node).
        group: the workers' group name in it.
        manager: vLLM's ``CoreEngineProcManager`` of this launcher (its ``processes`` list
            is what vLLM's engine monitor and shutdown go through).
        vllm_config, executor_class, log_stats: what the launcher started its engines with.
        gone_check_s: how often it looks for its ranks' exited processes.
    """

    def __init__(self, store, group: str, manager, vllm_config, executor_class,
                 log_stats: bool, gone_check_s: float = GONE_CHECK_S):
        self.store = store
        self.group = group
        self.manager = manager
        self.vllm_config = vllm_config
        self.executor_class = executor_class
        self.log_stats = log_stats
        self.ranks = local_ranks(vllm_config.parallel_config)
        self.node = this_host()
        self.liveness = GoneMarker(store, group, self.ranks,
                                   vllm_config.parallel_config.data_parallel_size, gone_check_s)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elastic-ft-node-agent",
                                        daemon=True)

    def start(self) -> NodeAgent:
        for rank in self.ranks:
            self.store.set(keys.node_agent(self.group, rank), self.node)
        self._thread.start()
        self.liveness.start()
        logger.info("node agent on %s: replacements of DP ranks %s start here",
                    self.node, list(self.ranks))
        return self

    def stop(self) -> None:
        self._stopped.set()
        self.liveness.stop()

    def _run(self) -> None:
        request_keys = {keys.replace_request(self.group, r): r for r in self.ranks}
        while not self._stopped.wait(POLL_INTERVAL_S):
            try:
                pending = [k for k in request_keys if self.store.check([k])]
            except Exception:  # noqa: BLE001 - the head (and its store) is unreachable
                continue  # a partition: nothing to start until it is back (logged above)
            for key in pending:
                rank = request_keys[key]
                try:
                    request = json.loads(self.store.get(key))
                    self.store.delete_key(key)
                    self._handle(rank, request)
                except Exception:  # noqa: BLE001 - one bad request must not end the agent
                    logger.exception("node agent: request for DP rank %d failed", rank)

    def _handle(self, rank: int, request: dict[str, Any]) -> None:
        if "stop_pid" in request:
            self._stop_engine(int(request["stop_pid"]))
            return
        if "cancel" in request:
            return  # withdrawn before it was read
        answer: dict[str, Any]
        try:
            process = self._start(rank, request["addresses"])
            if self._withdrawn(rank, request["id"]):  # the head gave up while it loaded
                self._stop_engine(process.pid)
                return
            answer = {"pid": process.pid, "node": self.node}
        except Exception as err:  # noqa: BLE001 - the head gets the reason
            logger.exception("node agent: replacement of DP rank %d did not start", rank)
            answer = {"error": f"{type(err).__name__}: {err}"[:500]}
        self.store.set(keys.replace_answer(self.group, rank, request["id"]), json.dumps(answer))

    def _start(self, rank: int, addresses: dict[str, Any]):
        self._stop_stale_engine(rank)
        process = self._launch(rank, addresses)
        # vLLM's engine monitor (patched: it re-reads this list) watches it from now on,
        # and the launcher's shutdown stops it with the others.
        self.manager.processes.append(process)
        logger.warning("node agent on %s: replacement engine for DP rank %d is up (pid %d)",
                       self.node, rank, process.pid)
        return process

    def _launch(self, rank: int, addresses: dict[str, Any]):
        """vLLM's engine core for ``rank``, loaded and warm, talking to the head's front end."""
        from vllm.v1.engine.utils import EngineZmqAddresses

        from vllm_elastic_ft.vllm.replacement import start_engine

        return start_engine(EngineZmqAddresses(**addresses), self.vllm_config,
                            self.executor_class, self.log_stats, rank,
                            local_rank=rank - self.ranks.start)

    def _stop_stale_engine(self, rank: int) -> None:
        """An engine of ``rank`` still running here is stale: the head replaces only a rank
        its group left out (e.g. a cut-off engine that met its fence once the link came
        back, and whose vLLM shutdown takes seconds). Two engines of one rank would share
        its routing id at the front end: the old one goes first."""
        for process in list(self.manager.processes):
            if process.name != f"EngineCore_DP{rank}" or not _running(process):
                continue
            logger.warning("node agent: DP rank %d's old engine (pid %d) still runs; it has "
                           "%.0fs to leave before its replacement starts", rank, process.pid,
                           STALE_LEAVE_S)
            if _exited_within(process, STALE_LEAVE_S):
                continue
            logger.warning("node agent: DP rank %d's old engine (pid %d) did not leave; "
                           "killing it", rank, process.pid)
            process.kill()
            if not _exited_within(process, STALE_STOP_TIMEOUT_S):
                raise RuntimeError(f"DP rank {rank}'s old engine (pid {process.pid}) did not "
                                   f"stop within {STALE_STOP_TIMEOUT_S:.0f}s")

    def _withdrawn(self, rank: int, request_id: str) -> bool:
        key = keys.replace_request(self.group, rank)
        if not self.store.check([key]):
            return False
        if json.loads(self.store.get(key)).get("cancel") != request_id:
            return False
        self.store.delete_key(key)
        return True

    def _stop_engine(self, pid: int) -> None:
        for process in list(self.manager.processes):
            if process.pid == pid and _running(process):
                logger.warning("node agent: stopping replacement engine pid %d (not admitted)",
                               pid)
                process.kill()


def _running(process) -> bool:
    """Whether an engine process of the manager's list runs.

    vLLM's engine monitor reaps and closes exited engines in its own thread, so asking
    ``multiprocessing`` alone is not enough here: a closed handle raises, and a child the
    other thread reaped first reads as running (its ``waitpid`` fails and multiprocessing
    takes that for "still running"). ``/proc`` settles it: gone or a zombie is not running."""
    try:
        alive = process.is_alive()
    except ValueError:  # "process object is closed"
        return False
    return alive and probe_process(process.pid) != "gone"


def watch_head_ranks(store, group: str, vllm_config) -> GoneMarker | None:
    """On a multi-node deployment's head (the API server, which started the head's
    engines): mark the head's own ranks ``gone`` when they exit, for the other nodes'
    ranks. None on a one-node deployment (every peer can probe every pid there)."""
    parallel = vllm_config.parallel_config
    if parallel.data_parallel_size_local >= parallel.data_parallel_size:
        return None
    return GoneMarker(store, group, local_ranks(parallel), parallel.data_parallel_size).start()


_agent: NodeAgent | None = None


def start_agent(manager) -> NodeAgent | None:
    """Start this headless launcher's node agent (once), if the plugin's store is known."""
    global _agent
    from vllm_elastic_ft.comm.store import connect_store
    from vllm_elastic_ft.vllm import headless
    from vllm_elastic_ft.vllm.watchdog_store import store_address
    from vllm_elastic_ft.vllm.worker_watchdog import GROUP_NAME

    if _agent is not None:
        return _agent
    launched = headless.launched_with()
    address = store_address()
    if launched is None or address is None:
        return None
    vllm_config, log_stats = launched
    from vllm.v1.executor import Executor

    _agent = NodeAgent(connect_store(address), GROUP_NAME, manager, vllm_config,
                       Executor.get_class(vllm_config), log_stats).start()
    return _agent


def _exited_within(process, timeout_s: float) -> bool:
    """Whether ``process`` is not running, waiting up to ``timeout_s`` for it to exit."""
    deadline = time.monotonic() + timeout_s
    while _running(process):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
