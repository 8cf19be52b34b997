"""In-engine recovery on a real DP=4 EP vLLM deployment (one start-up for the whole file).

In order, on the same server:

1. DP=4 EP serves the DP=1 greedy tokens, each rank holding 2 of the 8 experts;
2. SIGKILL of DP rank 0's worker under load: detected < 1 s, fenced, rebuilt over
   ranks 1-3 inside the running engines (same API server and engines, the
   orphaned experts loaded from the checkpoint), every request completes and
   the outputs still equal the DP=1 reference;
3. rejoin: a replacement engine and worker for DP rank 0 (``POST
   /elastic_ft/replace``) load rank 0's experts and are admitted at a new epoch
   while requests keep coming (no client retries): the group is back to 4 ranks
   and vLLM's layout, the other engines never restarted, outputs still equal
   the DP=1 reference;
4. a second fault during a rebuild (the rebuild is held by fault injection, and
   another rank is killed inside it): the group ends READY/HEALTHY or FAILED
   within its budget, never hangs, and if it serves its outputs are correct.
"""

import re
import threading
import time

import pytest

from vllm_elastic_ft import faults
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.loadgen import run_load
from vllm_elastic_ft.reports_in_logs import fault_reports
from vllm_elastic_ft.testing.server import ServerSpec, VLLMServer

from test_e2e_serving import PROMPTS, _check_placement, _greedy

pytestmark = pytest.mark.e2e

BUDGET_S = 20.0


@pytest.fixture(scope="module")
def dp4_server(tiny_moe_path, tmp_path_factory):
    spec = ServerSpec(tiny_moe_path, data_parallel_size=4, expert_parallel=True,
                      extra_args=["--elastic-ft-deadline-s", "2",
                                  "--elastic-ft-rebuild-budget-s", str(BUDGET_S),
                                  # the held-rebuild case below injects a delay
                                  "--elastic-ft-fault-injection"])
    with VLLMServer(spec, tmp_path_factory.mktemp("dp4") / "server.log") as server:
        server.wait_ready()
        yield server


def _wait_status(server: VLLMServer, done, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            status = server.get_json("/elastic_ft/status", timeout_s=1)
        except OSError:
            status = {}
        if status and done(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"status never reached the expected state: {status}\n"
                         + server.log_tail(80))


def test_dp4_ep_matches_dp1_and_shards_experts(dp4_server, reference_tokens):
    assert _greedy(dp4_server) == reference_tokens
    _check_placement(dp4_server.log_text(), 4)
    status = dp4_server.get_json("/elastic_ft/status")
    assert status["state"] == "HEALTHY" and status["live_ranks"] == [0, 1, 2, 3]


def test_kill_rank0_worker_under_load_rebuilds_in_engine(dp4_server, reference_tokens):
    engines_before = faults.find_rank_processes(dp4_server.proc.pid)
    victim = faults.rank_pid(dp4_server.proc.pid, 0, "worker")
    # The no-fault tokens of the load's requests (greedy, ignore_eos, 32 tokens).
    no_fault = {p: dp4_server.greedy_tokens(p, 32) for p in PROMPTS}
    resubmitted_before = _resubmitted(dp4_server)
    results = []
    # Only a 503 is retried: the design's refusal of new requests while the group is
    # fenced (the retries are counted below); any other failure is a lost request.
    load = threading.Thread(target=lambda: results.append(run_load(
        dp4_server.url, PROMPTS, 32, 8, max_tokens=32, timeout_s=120, progress_every_s=None,
        retry_for_s=60, stream_every=2)), daemon=True)
    load.start()
    _wait_running_on(dp4_server, 0)  # the kill must meet requests on rank 0
    injection = faults.signal_process("kill", victim, 0)
    status = _wait_status(dp4_server, lambda s: s["epoch"] >= 1 and s["state"] == "HEALTHY", 30)
    load.join(timeout=180)
    summary = results[0]
    # Every request completed; none was failed by the fault.
    assert summary.failed == 0 and summary.ok == 32, summary
    assert sum(r.stream for r in summary.records) == 16  # half streamed (OpenAI client)
    print(f"503 refusals retried while fenced: {summary.retried}")
    # Each request's tokens, the continued ones included, are the no-fault tokens.
    wrong = [r.index for r in summary.records if r.token_ids != no_fault[r.prompt]]
    assert not wrong, wrong
    # Detected within a second by a survivor, naming rank 0 dead.
    reports = [r for r in fault_reports(dp4_server.log_text()) if 0 in r["suspects"]]
    assert reports and reports[0]["kind"] == "dead", dp4_server.log_tail(60)
    assert reports[0]["detected_at"] - injection.at < 1.0
    # Rebuilt in place: same API server, the other engines never restarted.
    assert dp4_server.proc.poll() is None
    engines_after = faults.find_rank_processes(dp4_server.proc.pid)
    for rank in (1, 2, 3):
        assert engines_after[rank] == engines_before[rank]
    assert status["live_ranks"] == [1, 2, 3] and status["epoch"] == 1
    placement = status["expert_placement"]
    assert sorted(e for experts in placement.values() for e in experts) == list(range(8))
    assert set(placement) == {"1", "2", "3"}
    assert 0 in status["recovery"]["lost_ranks"]
    log = dp4_server.log_text()
    # Rank 0's experts (0 and 1), and only those, were loaded from the checkpoint.
    loaded = [int(e) for group in re.findall(r"loaded orphaned experts \[([\d, ]+)\]", log)
              for e in group.split(", ")]
    assert sorted(loaded) == [0, 1], loaded
    # Rank 0 held requests at the kill (8 in flight over 4 ranks): they were continued.
    assert _resubmitted(dp4_server) > resubmitted_before, status["recovery"]
    # Outputs after recovery equal the DP=1 reference.
    assert _greedy(dp4_server) == reference_tokens


def _resubmitted(server: VLLMServer) -> int:
    """Requests the front end re-submitted as continuations so far."""
    recovery = server.get_json("/elastic_ft/status").get("recovery") or {}
    return int(recovery.get("requests_resubmitted", 0))


def _wait_running_on(server: VLLMServer, engine: int, timeout_s: float = 60.0) -> None:
    """Until vLLM's own gauge says engine ``engine`` runs a request (a fixed sleep after the
    load starts met an idle rank 0 on a loaded CI box: nothing to re-submit)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in server.get_text("/metrics").splitlines():
            if (line.startswith("vllm:num_requests_running{") and f'engine="{engine}"' in line
                    and float(line.rsplit(" ", 1)[1]) > 0):
                return
        time.sleep(0.05)
    raise AssertionError(f"no request ran on engine {engine} within {timeout_s:.0f}s")


def _engine_successes(server: VLLMServer, engine: int) -> float:
    pattern = rf'vllm:request_success_total{{engine="{engine}",finished_reason="length"[^}}]*}} (\S+)'
    return sum(float(v) for v in re.findall(pattern, server.get_text("/metrics")))


def test_replacement_rank0_rejoins_under_load(dp4_server, reference_tokens):
    before = dp4_server.get_json("/elastic_ft/status")
    assert before["recovery"]["lost_ranks"] == [0] and before["live_ranks"] == [1, 2, 3]
    engines_before = faults.find_rank_processes(dp4_server.proc.pid)
    served_by_0 = _engine_successes(dp4_server, 0)
    # Only a lost rank can be replaced; a bad body names the field.
    code, answer = dp4_server.post_json("/elastic_ft/replace", {"rank": 2})
    assert code == 409 and "not lost" in answer["error"], answer
    code, answer = dp4_server.post_json("/elastic_ft/replace", {"rank": "zero"})
    assert code == 400 and "'rank'" in answer["error"], answer
    results = []
    load = threading.Thread(target=lambda: results.append(run_load(
        dp4_server.url, PROMPTS, 40, 8, max_tokens=32, timeout_s=120, progress_every_s=None,
        stream_every=2)), daemon=True)
    load.start()
    time.sleep(1.5)  # requests are running on ranks 1-3
    code, answer = dp4_server.post_json("/elastic_ft/replace", {"rank": 0})
    assert code == 200, (answer, dp4_server.log_tail(80))
    assert answer["members"] == [0, 1, 2, 3]
    load.join(timeout=180)
    # No client retries, and every request completed: the admission paused the
    # group (requests queued), it refused or lost nothing.
    assert results and results[0].failed == 0 and results[0].ok == 40, results
    status = _wait_status(dp4_server, lambda s: s["live_ranks"] == [0, 1, 2, 3], 10)
    assert status["epoch"] == before["epoch"] + 1 and status["recovery"]["lost_ranks"] == []
    assert status["recovery"]["replaced_ranks"] == [0]
    # Back to vLLM's layout: the replacement computes the experts it loaded (0, 1);
    # the rank that took them over in the shrink stopped computing them.
    assert status["expert_placement"] == {"0": [0, 1], "1": [2, 3], "2": [4, 5], "3": [6, 7]}
    stopped = [int(e) for group in re.findall(r"stopped computing experts \[([\d, ]+)\]",
                                               dp4_server.log_text()) for e in group.split(", ")]
    assert sorted(stopped) == [0, 1], stopped
    engines_after = faults.find_rank_processes(dp4_server.proc.pid)
    for rank in (1, 2, 3):
        assert engines_after[rank] == engines_before[rank]
    assert engines_after[0]["engine"] == answer["pid"]
    assert _greedy(dp4_server) == reference_tokens
    assert _engine_successes(dp4_server, 0) > served_by_0  # the replacement serves


def test_second_fault_during_rebuild_ends_in_ready_or_failed(dp4_server, reference_tokens):
    status = dp4_server.get_json("/elastic_ft/status")
    epoch, survivors = status["epoch"], [r for r in status["live_ranks"] if r not in (2, 3)]
    store = connect_store(dp4_server.store)
    faults.set_rebuild_delay(store, "dp", 1.5)
    first = faults.rank_pid(dp4_server.proc.pid, 3, "worker")
    second = faults.rank_pid(dp4_server.proc.pid, 2, "worker")
    results = []
    load = threading.Thread(target=lambda: results.append(run_load(
        dp4_server.url, PROMPTS, 16, 4, max_tokens=32, timeout_s=120, progress_every_s=None,
        retry_for_s=60, stream_every=2)), daemon=True)
    load.start()
    time.sleep(1.5)
    faults.signal_process("kill", first, 3)
    _wait_status(dp4_server, lambda s: s["epoch"] >= epoch + 1, 10)
    time.sleep(0.3)  # the survivors sit in their (held) rebuild
    faults.signal_process("kill", second, 2)
    started = time.monotonic()
    final: dict = {}
    while time.monotonic() - started < BUDGET_S + 10:
        if dp4_server.proc.poll() is not None:
            final = {"state": "FAILED", "reason": "the deployment shut itself down"}
            break
        try:
            final = dp4_server.get_json("/elastic_ft/status", timeout_s=1)
        except OSError:
            final = {}
        if final.get("state") == "FAILED" or (final.get("state") == "HEALTHY"
                                              and final["live_ranks"] == survivors):
            break
        time.sleep(0.05)
    # Settled one way or the other within the budget: never a hang.
    assert final.get("state") in ("HEALTHY", "FAILED"), final
    faults.set_rebuild_delay(store, "dp", 0)
    load.join(timeout=180)
    if final["state"] == "HEALTHY":
        assert results and results[0].failed == 0, results
        assert sorted(e for v in final["expert_placement"].values() for e in v) == list(range(8))
        assert _greedy(dp4_server) == reference_tokens
