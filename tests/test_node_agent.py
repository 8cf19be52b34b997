"""The node agent's protocol (``vllm/node_agent.py``): the head asks a node to start a lost
rank's replacement through the store, and gets the engine's pid or the node's error. Real
TCPStore and real processes (a stand-in for vLLM's engine start only: a real engine needs
the whole deployment, which ``tests/test_e2e_nodes.py`` runs)."""

from __future__ import annotations

import multiprocessing
import signal
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.vllm import node_agent


@pytest.fixture()
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def _sleeper(name: str, seconds: float = 60):
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(seconds,),
                                                        name=name)
    proc.start()
    return proc


class _Agent(node_agent.NodeAgent):
    """The real agent with vLLM's engine start (``_launch``) played by a sleeping process."""

    start_s = 0.0
    fail_with: str | None = None

    def _launch(self, rank, addresses):
        time.sleep(self.start_s)
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        self.addresses = addresses
        return _sleeper(f"EngineCore_DP{rank}")


@pytest.fixture()
def agent(store):
    config = SimpleNamespace(parallel_config=SimpleNamespace(
        data_parallel_rank=2, data_parallel_size_local=2, data_parallel_size=4))
    manager = SimpleNamespace(processes=[])
    made = _Agent(store, "dp", manager, config, executor_class=None, log_stats=False).start()
    yield made
    made.stop()
    for proc in manager.processes:
        proc.kill()


def test_the_node_that_serves_a_rank_starts_its_replacement(store, agent):
    from vllm.v1.engine.utils import EngineZmqAddresses

    addresses = EngineZmqAddresses(inputs=["tcp://10.213.0.1:5555"],
                                   outputs=["tcp://10.213.0.1:5556"])
    assert list(node_agent.local_ranks(agent.vllm_config.parallel_config)) == [2, 3]
    answer = node_agent.start_remote(store, "dp", 3, addresses, timeout_s=30)
    started = agent.manager.processes[-1]
    assert answer == {"pid": started.pid, "node": agent.node} and started.is_alive()
    assert agent.addresses["inputs"] == ["tcp://10.213.0.1:5555"]  # what the head sent
    # Not admitted after all: the head asks the node to stop it.
    node_agent.withdraw(store, "dp", 3, started.pid)
    started.join(timeout=10)
    assert not started.is_alive()


def test_a_rank_no_agent_serves_is_a_clear_error(store, agent):
    from vllm.v1.engine.utils import EngineZmqAddresses

    with pytest.raises(RuntimeError, match="no node agent serves DP rank 0"):
        node_agent.start_remote(store, "dp", 0, EngineZmqAddresses([], []), timeout_s=5)


def test_the_nodes_error_reaches_the_head(store, agent):
    from vllm.v1.engine.utils import EngineZmqAddresses

    agent.fail_with = "model load failed"
    with pytest.raises(RuntimeError, match="DP rank 2's node could not start it: "
                                           "RuntimeError: model load failed"):
        node_agent.start_remote(store, "dp", 2, EngineZmqAddresses([], []), timeout_s=30)


def test_a_start_the_head_gave_up_on_is_stopped_on_the_node(store, agent):
    from vllm.v1.engine.utils import EngineZmqAddresses

    agent.start_s = 2.0
    with pytest.raises(TimeoutError, match="did not start its replacement within"):
        node_agent.start_remote(store, "dp", 2, EngineZmqAddresses([], []), timeout_s=0.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
            agent.manager.processes and not agent.manager.processes[-1].is_alive()):
        time.sleep(0.1)
    assert agent.manager.processes and not agent.manager.processes[-1].is_alive(), \
        "the late engine still runs"
    assert not store.check([keys.replace_request("dp", 2)])


def test_an_old_engine_of_the_rank_is_stopped_before_its_replacement_starts(store, agent,
                                                                             monkeypatch):
    """The head replaces only a rank its group left out: an engine of that rank still
    running on the node is stale (a cut-off engine whose vLLM shutdown takes seconds) and
    would share the rank's routing id with the new one. It gets ``STALE_LEAVE_S`` to leave
    by itself; one that does not is killed."""
    monkeypatch.setattr(node_agent, "STALE_LEAVE_S", 0.5)
    stale = _sleeper("EngineCore_DP2")
    other = _sleeper("EngineCore_DP3")
    agent.manager.processes += [stale, other]
    from vllm.v1.engine.utils import EngineZmqAddresses

    answer = node_agent.start_remote(store, "dp", 2, EngineZmqAddresses([], []), timeout_s=30)
    assert answer["pid"] == agent.manager.processes[-1].pid != stale.pid
    assert not stale.is_alive() and other.is_alive()
    assert stale.exitcode == -signal.SIGKILL


def test_an_old_engine_that_leaves_within_its_grace_is_not_killed(store, agent, monkeypatch):
    """A cut-off engine meets its fence once the link is back and exits by itself (its
    refusal at the stale epoch is in its log): the agent waits for that, kills nothing."""
    monkeypatch.setattr(node_agent, "STALE_LEAVE_S", 20.0)
    leaving = _sleeper("EngineCore_DP2", seconds=1.5)
    agent.manager.processes.append(leaving)
    from vllm.v1.engine.utils import EngineZmqAddresses

    answer = node_agent.start_remote(store, "dp", 2, EngineZmqAddresses([], []), timeout_s=30)
    assert answer["pid"] != leaving.pid
    leaving.join(timeout=5)
    assert leaving.exitcode == 0, "the agent killed an engine that was leaving by itself"


def test_a_rank_whose_process_exited_is_marked_gone_for_its_remote_peers(store, agent):
    """Its peers on other nodes cannot probe its pid: the node agent probes it in its own
    ``/proc`` and marks its heartbeat ``gone``, which a peer's attribution names dead (with
    no heartbeat gone stale). A live rank, and a status written on another node, stay."""
    import json

    from vllm_elastic_ft.watchdog import attribution
    from vllm_elastic_ft.watchdog.report import FaultKind

    agent.stop()  # its own thread would race this test's calls
    worker, other = _sleeper("worker-2"), _sleeper("worker-3")
    store.set(keys.epoch("dp"), "1")
    store.set(keys.members("dp", 1), json.dumps({"members": [0, 2, 3], "placement": {},
                                                 "leader": 0}))
    for group_rank, (rank, proc) in enumerate([(2, worker), (3, other)], start=1):
        store.set(keys.heartbeat("dp", 1, group_rank), attribution.RankStatus(
            rank, proc.pid, agent.node, time.time(), 5, 5).encode())
    assert agent.liveness.mark_gone_ranks() == []
    worker.kill()
    worker.join()
    assert agent.liveness.mark_gone_ranks() == [2]
    status = attribution.RankStatus.decode(store.get(keys.heartbeat("dp", 1, 1)))
    assert status.state == "gone" and status.pid == worker.pid
    kind, why = attribution.classify_peer(time.time(), status, "unknown", time.time(),
                                          stale_s=2.0, hung_s=0.2, peer_closed=False)
    assert kind is FaultKind.DEAD and f"saw process {worker.pid} exit" in why
    assert attribution.RankStatus.decode(store.get(keys.heartbeat("dp", 1, 2))).state == \
        "running"
    assert agent.liveness.mark_gone_ranks() == []  # marked once
    # A status from another node (its pid means nothing here) is never judged here.
    store.set(keys.heartbeat("dp", 1, 2), attribution.RankStatus(
        3, 999999, "elsewhere/pid:[1]", time.time(), 5, 5).encode())
    assert agent.liveness.mark_gone_ranks() == []
    other.kill()


def test_an_engine_another_thread_reaped_is_not_running():
    """vLLM's engine monitor reaps exited engines in its own thread: multiprocessing then
    reads the child as still running (its waitpid fails); the agent must not (the first
    two-node drill's rejoin failed on it: 'old engine did not stop')."""
    import os

    proc = _sleeper("EngineCore_DP2")
    proc.kill()
    os.waitpid(proc.pid, 0)  # what the monitor's thread did first
    assert proc.is_alive(), "multiprocessing's own answer (the trap)"
    assert not node_agent._running(proc)


def test_the_head_marks_its_own_ranks_only_on_a_multi_node_deployment(store):
    """The API server started the head's engines: on a multi-node deployment it marks them
    for the other nodes' ranks; on one node there is no one who cannot probe them."""
    def config(local, world):
        return SimpleNamespace(parallel_config=SimpleNamespace(
            data_parallel_rank=0, data_parallel_size_local=local, data_parallel_size=world))

    assert node_agent.watch_head_ranks(store, "dp", config(4, 4)) is None
    marker = node_agent.watch_head_ranks(store, "dp", config(2, 4))
    try:
        assert list(marker.ranks) == [0, 1] and marker.world == 4
    finally:
        marker.stop()
