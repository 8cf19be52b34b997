"""A DP group across two simulated nodes (issue 13): vLLM's own multi-node DP, DP=4 with EP,
2 ranks per node. Node 1 runs vLLM's headless launcher in a network and PID namespace of its
own (``testing/nodes.py``): the head node cannot see its processes in ``/proc``; the
watchdog store is on the head node, at its DP address.

1. SIGKILL of rank 2's worker (on node 1) under load: named dead (by its node-mate, the only
   rank that can see its process), the group rebuilds in place without it, every request
   completes with its no-fault tokens (only a 503 while fenced is retried: counted).
2. Rank 2 is replaced on node 1 (its launcher is the node agent), under load.
3. Node 1's link cut under load (its processes live on): the head side, which has the store,
   rebuilds without it and serves, no request lost; once the link is back, the cut-off ranks
   are refused (fenced out at their stale epoch), exit, and come back as replacements on
   node 1.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import serve_on_simulated_nodes

from vllm_elastic_ft import faults
from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.loadgen import run_load
from vllm_elastic_ft.reports_in_logs import fault_reports
from vllm_elastic_ft.testing.multinode import MultiNodeServer

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Wide expert parallel serving", "0 1 2 3 4 5"]


@pytest.fixture(scope="module")
def two_nodes(tiny_moe_path, tmp_path_factory):
    yield from serve_on_simulated_nodes(tiny_moe_path, tmp_path_factory.mktemp("nodes"), 4, 2)


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_rank_killed_on_the_secondary_node_is_named_and_the_group_heals(two_nodes):
    server = two_nodes
    store = connect_store(server.store)
    assert server.head.get_json("/elastic_ft/status")["state"] == "HEALTHY"
    no_fault = {p: server.head.greedy_tokens(p, 32) for p in PROMPTS}
    victim = server.worker_pid(2)
    results: list = []
    # Only a 503 is retried: the design's refusal of new requests while the group is fenced
    # (counted below); any other failure is a lost request.
    load = threading.Thread(target=lambda: results.append(run_load(
        server.url, PROMPTS, 32, 8, max_tokens=32, timeout_s=180, progress_every_s=None,
        retry_for_s=60, stream_every=2)), daemon=True)
    load.start()
    time.sleep(2.0)  # requests are running on every rank
    injection = faults.signal_process("kill", victim, 2)
    _wait(lambda: store.check([keys.serving("dp", 1)]), 60, "the group to serve at epoch 1")
    serving_s = time.time() - injection.at
    load.join(timeout=300)
    summary = results[0]
    assert summary.failed == 0 and summary.ok == 32, [r.error for r in summary.records
                                                      if not r.ok]
    assert sum(r.stream for r in summary.records) == 16  # half streamed (OpenAI client)
    wrong = [(r.index, r.prompt, r.token_ids, no_fault[r.prompt]) for r in summary.records
             if r.token_ids != no_fault[r.prompt]]
    assert not wrong, (len(wrong), wrong[:2])
    members = json.loads(store.get(keys.members("dp", 1)))
    assert members["members"] == [0, 1, 3]
    assert sorted(e for ex in members["placement"].values() for e in ex) == list(range(8))
    reports = [r for r in fault_reports(server.log_text()) if 2 in r["suspects"]]
    assert reports, "nobody named rank 2"
    first = min(reports, key=lambda r: r["detected_at"])
    assert first["kind"] == "dead", first
    # Only its node-mate can see its process; the head node's ranks cannot probe it.
    for report in reports:
        if report["reporter"] in (0, 1):
            assert "is gone" not in json.dumps(report["evidence"]), report
    detect_s = first["detected_at"] - injection.at
    print(f"two nodes: rank 2 named dead by rank {first['reporter']} after {detect_s:.3f}s; "
          f"serving again at epoch 1 after {serving_s:.2f}s; 503s retried: {summary.retried}")
    assert detect_s < 2.0, detect_s


def _on_node(server: MultiNodeServer, rank: int, node: int) -> bool:
    """Whether DP rank ``rank``'s worker is a process of node ``node``'s vLLM launcher."""
    try:
        server.worker_pid(rank, node=node)
    except LookupError:
        return False
    return True


def test_a_lost_rank_is_replaced_on_its_own_node(two_nodes):
    """Issue 13: ``POST /elastic_ft/replace`` of rank 2 (lost on node 1 above) starts the new
    engine on node 1, through its headless launcher (the node agent), not on the head: its
    worker is a process of node 1's launcher and none of the head's. Requests running
    through the admission all complete (only a 503 while fenced is retried: counted), and
    the group is back to 4 ranks, vLLM's contiguous layout, serving the no-fault tokens."""
    server = two_nodes
    store = connect_store(server.store)
    before = {p: server.head.greedy_tokens(p, 32) for p in PROMPTS}  # DP=3 = no fault (test 1)
    assert not _on_node(server, 2, 1)
    results: list = []
    load = threading.Thread(target=lambda: results.append(run_load(
        server.url, PROMPTS, 24, 4, max_tokens=32, timeout_s=600, progress_every_s=None,
        retry_for_s=60, stream_every=2)), daemon=True)
    load.start()
    code, answer = server.head.post_json("/elastic_ft/replace", {"rank": 2}, timeout_s=600)
    assert code == 200 and answer["members"] == [0, 1, 2, 3], answer
    assert _on_node(server, 2, 1) and not _on_node(server, 2, 0)
    # The node agent that started it says where: node 1's PID namespace, not the head's.
    namespace = lambda pid: os.readlink(f"/proc/{pid}/ns/pid")  # noqa: E731
    assert answer["node"].endswith(namespace(server.worker_pid(2, node=1))), answer
    assert namespace(server.worker_pid(2, node=1)) != namespace(server.worker_pid(0)), answer
    load.join(timeout=600)
    summary = results[0]
    assert summary.failed == 0 and summary.ok == 24, [r.error for r in summary.records
                                                      if not r.ok]
    status = server.head.get_json("/elastic_ft/status")
    assert status["live_ranks"] == [0, 1, 2, 3] and status["recovery"]["lost_ranks"] == []
    assert status["expert_placement"] == {str(r): [2 * r, 2 * r + 1] for r in range(4)}
    members = json.loads(store.get(keys.members("dp", status["epoch"])))
    assert members["members"] == [0, 1, 2, 3]
    assert {p: server.head.greedy_tokens(p, 32) for p in PROMPTS} == before
    print(f"replaced on node 1: rank 2 started in {answer['start_s']:.1f}s, admitted in "
          f"{answer['admit_s']:.2f}s on {answer['node']}; 503s retried: {summary.retried}")


def test_a_partitioned_node_is_left_out_and_refused_after_the_link_returns(two_nodes):
    """Issue 13: node 1's link goes down (its processes live on, unreachable) under load. The
    head side, which has the store, rebuilds without it and serves; no request is lost (only
    a 503 while fenced is retried, counted). When the link returns, the cut-off rank is not
    let back in by itself: the head side's membership stays, and it serves on."""
    server = two_nodes
    store = connect_store(server.store)
    from vllm_elastic_ft.group.fencing import current_epoch

    before = current_epoch(store, "dp")
    members_before = json.loads(store.get(keys.members("dp", before)))["members"]
    cut_off = [r for r in members_before if r >= 2]
    assert cut_off, members_before
    no_fault = {p: server.head.greedy_tokens(p, 32) for p in PROMPTS}
    results: list = []
    load = threading.Thread(target=lambda: results.append(run_load(
        server.url, PROMPTS, 32, 8, max_tokens=32, timeout_s=180, progress_every_s=None,
        retry_for_s=90, stream_every=2)), daemon=True)
    load.start()
    time.sleep(2.0)
    cut_at = time.time()
    server.nodes.cut(1)

    def head_side_serving():
        epoch = current_epoch(store, "dp")
        if epoch <= before or not store.check([keys.serving("dp", epoch)]):
            return None
        return epoch, json.loads(store.get(keys.members("dp", epoch)))["members"]

    epoch, members = _wait(head_side_serving, 90, "the head side to serve without node 1")
    serving_s = time.time() - cut_at
    assert members == [r for r in members_before if r < 2], members
    load.join(timeout=300)
    summary = results[0]
    assert summary.failed == 0 and summary.ok == 32, [r.error for r in summary.records
                                                      if not r.ok]
    # No half group served anything: every text is the full group's.
    wrong = [(r.index, r.prompt) for r in summary.records if r.token_ids != no_fault[r.prompt]]
    assert not wrong, (len(wrong), wrong[:2])
    server.nodes.heal(1)
    time.sleep(10)  # the cut-off rank sees the store again
    latest = current_epoch(store, "dp")
    assert all(r not in json.loads(store.get(keys.members("dp", e)))["members"]
               for e in range(epoch, latest + 1) if store.check([keys.members("dp", e)])
               for r in cut_off), "a cut-off rank got back in by itself"
    after: list = []
    load = threading.Thread(target=lambda: after.append(run_load(
        server.url, PROMPTS, 12, 4, max_tokens=16, timeout_s=120, progress_every_s=None,
        retry_for_s=30, stream_every=2)), daemon=True)
    load.start()
    load.join(timeout=200)
    assert after[0].failed == 0 and after[0].ok == 12
    # Refused at their stale epoch, the cut-off engines exit; node 1's launcher (its node
    # agent) stays, and each cut-off rank comes back as a replacement on node 1.
    _wait(lambda: not any(_on_node(server, r, 1) for r in cut_off), 120,
          "the cut-off engines to exit")
    rejoined = {}
    for rank in cut_off:
        code, answer = server.head.post_json("/elastic_ft/replace", {"rank": rank},
                                             timeout_s=600)
        assert code == 200 and rank in answer["members"], answer
        assert _on_node(server, rank, 1)
        rejoined[rank] = answer["start_s"]
    status = server.head.get_json("/elastic_ft/status")
    assert status["live_ranks"] == members_before, status
    assert {p: server.head.greedy_tokens(p, 32) for p in PROMPTS} == no_fault
    print(f"partition: head side serving at epoch {epoch} with {members} after {serving_s:.2f}s;"
          f" 503s retried during the cut: {summary.retried}; epoch after the link returned: "
          f"{latest}; cut-off ranks rejoined as replacements on node 1: {rejoined}")
