"""CPU wide-EP through real vLLM servers: DP+EP serves the same greedy tokens as DP=1,
and the rank watchdog names a killed worker (the group then shrinks in place; the
full in-engine recovery checks are in test_e2e_in_engine.py).

Each server is a real ``vllm.entrypoints.openai.api_server`` with the plugin on
the tiny float32 MoE. Start-ups dominate (tens of seconds each on 2 cores), so
the DP=1 reference is taken once per session and one DP=2 server serves both
the correctness test, the kill test and, last, the replacement test.
"""

import re
import subprocess
import time

import pytest

from vllm_elastic_ft import faults
from vllm_elastic_ft.reports_in_logs import fault_reports
from vllm_elastic_ft.testing.server import ServerSpec, VLLMServer

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The quick brown fox",
    "Wide expert parallel serving",
    "0 1 2 3 4 5",
    "def f(x): return",
    "When one rank dies or hangs the whole group",
    "Questions and answers",
]
MAX_TOKENS = 24


def _greedy(server: VLLMServer) -> list[list[int]]:
    return [server.greedy_tokens(p, MAX_TOKENS) for p in PROMPTS]


def _check_placement(log: str, dp: int) -> None:
    assert "NotImplementedError" not in log
    # Every rank holds and computes exactly its contiguous share of the 8 experts.
    placement = {
        (int(rank), tuple(int(e) for e in experts.split(", ")), int(params))
        for rank, experts, params in re.findall(
            rf"EP rank (\d+)/{dp} computes local experts \[([\d, ]+)\] of 8; "
            r"local expert params: (\d+)",
            log,
        )
    }
    per_rank = 8 // dp
    assert {(r, e) for r, e, _ in placement} == {
        (r, tuple(range(r * per_rank, (r + 1) * per_rank))) for r in range(dp)
    }
    # 128x128 (w13) + 128x64 (w2) parameters per local expert.
    assert {p for _, _, p in placement} == {per_rank * (128 * 128 + 128 * 64)}


@pytest.fixture(scope="module")
def dp2_server(tiny_moe_path, tmp_path_factory):
    """One DP=2 EP server: a kill before the first request, then the replacement."""
    spec = ServerSpec(tiny_moe_path, data_parallel_size=2, expert_parallel=True,
                      extra_args=["--elastic-ft-heartbeat-interval-s", "0.05"])
    with VLLMServer(spec, tmp_path_factory.mktemp("dp2") / "server.log") as server:
        server.wait_ready()
        yield server


def test_dp2_worker_killed_before_the_first_request_is_named_and_the_group_rebuilds(
        dp2_server, reference_tokens):
    """The ranks are watched from start-up: SIGKILL rank 1's worker before any request
    ran; rank 0's watchdog names it dead in < 1 s (no collective needed), rank 0 rebuilds
    the group while idle, and the first request is served correctly by the group of one."""
    status = dp2_server.get_json("/elastic_ft/status")
    assert status["state"] == "HEALTHY" and status["epoch"] == 0 and status["live_ranks"] == [0, 1]
    assert status["expert_placement"] == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    logs = dp2_server.log_text()
    assert "POST /v1/completions" not in logs, "no request may run before the kill"
    assert "rank watchdog up: group=dp epoch=0 rank=0/2" in logs
    assert "rank watchdog up: group=dp epoch=0 rank=1/2" in logs
    victim = faults.rank_pid(dp2_server.proc.pid, 1, "worker")
    survivor = faults.rank_pid(dp2_server.proc.pid, 0, "worker")
    injection = faults.signal_process("kill", victim, 1)
    report, status = None, {}
    deadline = time.monotonic() + 20
    while (report is None or status.get("epoch") != 1 or status.get("state") != "HEALTHY") \
            and time.monotonic() < deadline:
        found = [r for r in fault_reports(dp2_server.log_text()) if r["reporter"] == 0]
        report = found[0] if found else report
        try:
            status = dp2_server.get_json("/elastic_ft/status", timeout_s=1)
        except OSError:
            pass
        time.sleep(0.05)
    assert report is not None, dp2_server.log_tail(60)
    assert report["suspects"] == [1] and report["kind"] == "dead"
    assert report["group"] == "dp" and report["epoch"] == 0
    assert report["detected_at"] - injection.at < 1.0, report
    # Rebuilt while idle: fenced at epoch 1 without rank 1, READY, and serving again (the
    # idle rebuild marks its epoch serving: the new communicator took every member) with
    # no request sent (an idle healed group must not sit in READY until traffic comes).
    assert status["epoch"] == 1 and status["live_ranks"] == [0], status
    assert status["last_report"]["suspects"] == [1]
    states = [e["state"] for e in status["events"]]
    assert states == ["HEALTHY", "FENCED", "REBUILDING", "READY", "HEALTHY"], states
    assert "POST /v1/completions" not in dp2_server.log_text(), "HEALTHY without any request"
    assert "a peer failed while this rank was idle" in dp2_server.log_text()
    # The report is the survivor worker's own log line (the counter rides in "#1").
    line = next(l for l in dp2_server.log_text().splitlines() if "FaultReport #1" in l)
    assert f"pid={survivor})" in line and "Worker_DP0" in line
    # The first requests run on the group of one (it holds all 8 experts now), correctly.
    assert _greedy(dp2_server) == reference_tokens
    status = dp2_server.get_json("/elastic_ft/status")
    assert status["state"] == "HEALTHY" and status["expert_placement"] == {"0": list(range(8))}
    metrics = dp2_server.get_text("/metrics")
    assert 'elastic_ft_group_epoch{group="dp"} 1.0' in metrics
    assert 'elastic_ft_recoveries_total{group="dp"} 1.0' in metrics


def test_a_replacement_rejoins_and_is_a_full_member(dp2_server, reference_tokens):
    """Rank 1 (lost above) is replaced: back to two ranks and vLLM's layout, each rank
    computing its contiguous half of the experts, outputs equal DP=1 (the DP=2 EP
    correctness check of this module; DP=4 checks its original engines); then the replacement's own worker is killed and the group shrinks around it again,
    named by the survivor's watchdog (the replacement is a member like any other)."""
    code, answer = dp2_server.post_json("/elastic_ft/replace", {"rank": 1})
    assert code == 200 and answer["members"] == [0, 1], (answer, dp2_server.log_tail(60))
    status = dp2_server.get_json("/elastic_ft/status")
    assert status["live_ranks"] == [0, 1] and status["recovery"]["lost_ranks"] == []
    assert status["expert_placement"] == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    assert _greedy(dp2_server) == reference_tokens
    epoch = status["epoch"]
    time.sleep(2.0)  # let the wave of dummy steps end
    faults.signal_process("kill", faults.rank_pid(dp2_server.proc.pid, 1, "worker"), 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = dp2_server.get_json("/elastic_ft/status")
        if status["epoch"] > epoch and status["state"] in ("READY", "HEALTHY"):
            break
        time.sleep(0.05)
    assert status["live_ranks"] == [0] and status["recovery"]["lost_ranks"] == [1], status
    assert any(r["epoch"] == epoch and r["suspects"] == [1]
               for r in fault_reports(dp2_server.log_text())), dp2_server.log_tail(40)
    assert _greedy(dp2_server) == reference_tokens


def test_bad_config_key_stops_startup_before_model_load(tiny_moe_path):
    spec = ServerSpec(
        tiny_moe_path,
        extra_args=["--additional-config", '{"elastic_ft": {"cpu_dispatch": "ring"}}'],
    )
    result = subprocess.run(
        spec.argv(port=1), env=spec.environ(), capture_output=True, text=True, timeout=180
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ElasticFTConfigError: elastic_ft.cpu_dispatch must be one of" in output
    assert "'all_to_all'" in output and "got 'ring'" in output
    assert "Starting to load model" not in output
    assert "Loading weights" not in output


def test_bad_flag_value_stops_startup(tiny_moe_path):
    spec = ServerSpec(tiny_moe_path, extra_args=["--elastic-ft-cpu-dispatch", "ring"])
    result = subprocess.run(
        spec.argv(port=1), env=spec.environ(), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 2
    assert "--elastic-ft-cpu-dispatch: invalid choice: 'ring'" in result.stderr
