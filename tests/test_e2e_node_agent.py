"""A node's only rank dies (issue 13): no peer shares its ``/proc``. DP=2 with EP over two
simulated nodes, one rank each (``testing/nodes.py``; vLLM's headless launcher on node 1).

SIGKILL of rank 1's worker under load: node 1's launcher — its node agent — sees the pid gone
in its own ``/proc`` and marks the rank's heartbeat ``gone``; rank 0, on the head node, names
it dead from that mark, not from a heartbeat gone stale (``heartbeat_stale_s`` = 2 s), and the
group of one serves every request with its no-fault tokens (only a 503 while fenced is
retried: counted). Then the rank is replaced on node 1.
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import serve_on_simulated_nodes

from vllm_elastic_ft import faults
from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.loadgen import run_load
from vllm_elastic_ft.reports_in_logs import fault_reports

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Wide expert parallel serving", "0 1 2 3 4 5"]


@pytest.fixture(scope="module")
def one_rank_per_node(tiny_moe_path, tmp_path_factory):
    yield from serve_on_simulated_nodes(tiny_moe_path, tmp_path_factory.mktemp("agent"), 2, 2)


def test_a_nodes_only_rank_is_named_dead_by_its_node_agent(one_rank_per_node):
    server = one_rank_per_node
    store = connect_store(server.store)
    no_fault = {p: server.head.greedy_tokens(p, 32) for p in PROMPTS}
    victim = server.worker_pid(1)
    results: list = []
    load = threading.Thread(target=lambda: results.append(run_load(
        server.url, PROMPTS, 24, 4, max_tokens=32, timeout_s=180, progress_every_s=None,
        retry_for_s=60, stream_every=2)), daemon=True)
    load.start()
    time.sleep(2.0)  # requests are running on both ranks
    injection = faults.signal_process("kill", victim, 1)
    deadline = time.monotonic() + 60
    while not store.check([keys.serving("dp", 1)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    serving_s = time.time() - injection.at
    load.join(timeout=300)
    summary = results[0]
    assert summary.failed == 0 and summary.ok == 24, [r.error for r in summary.records
                                                      if not r.ok]
    wrong = [(r.index, r.prompt) for r in summary.records if r.token_ids != no_fault[r.prompt]]
    assert not wrong, (len(wrong), wrong[:2])
    logs = server.log_text()
    assert "node agent on" in logs and "marked gone for its peers" in logs, "no agent mark"
    reports = [r for r in fault_reports(logs) if r["reporter"] == 0 and 1 in r["suspects"]]
    assert reports, "rank 0 never named rank 1"
    first = min(reports, key=lambda r: r["detected_at"])
    # Dead, from the agent's mark: not "no heartbeat for 2.0s" (staleness), and not a probe
    # of a pid rank 0 cannot see.
    assert first["kind"] == "dead" and "node's agent saw process" in first["evidence"]["1"], \
        first
    detect_s = first["detected_at"] - injection.at
    print(f"node agent: rank 1 (node 1's only rank) named dead by rank 0 after {detect_s:.3f}s;"
          f" serving again at epoch 1 after {serving_s:.2f}s; 503s retried: {summary.retried}")
    assert detect_s < 2.0, detect_s  # heartbeat_stale_s: what it took without the agent


def test_the_lost_rank_comes_back_on_its_node(one_rank_per_node):
    server = one_rank_per_node
    code, answer = server.head.post_json("/elastic_ft/replace", {"rank": 1}, timeout_s=600)
    assert code == 200 and answer["members"] == [0, 1], answer
    server.worker_pid(1, node=1)  # its worker runs on node 1 (LookupError otherwise)
    status = server.head.get_json("/elastic_ft/status")
    assert status["live_ranks"] == [0, 1] and status["expert_placement"] == {
        "0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
