"""The main job end to end: `vllm-elastic-ft drill` on a real DP=2 EP deployment.

A worker is SIGKILLed under load; the drill plays the orchestrator (a group
restart, the fallback path while the in-engine rebuild is not wired into vLLM)
and a client that retries like an ingress. No accepted request may be lost and
the outputs after recovery must equal those taken before the fault.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_drill_kill_worker_loses_no_request(tiny_moe_path, tmp_path):
    out = tmp_path / "drill"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_elastic_ft.cli", "drill", "--requests", "24",
         "--concurrency", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["requests_sent"] == result["requests_ok"] == 24
    assert result["requests_lost"] == 0 and result["requests_retried"] >= 1
    assert result["outputs_match_reference"] is True
    assert result["detect_s"] < 1.0 and result["fence_s"] < 1.0
    assert result["report"]["suspects"] == [1] and result["report"]["kind"] == "dead"
    assert result["recovery"] == "group_restart"
    assert result["interruption_s"] >= result["rebuild_s"] > 0
    assert result["final_state"] == "HEALTHY" and result["live_ranks"] == [0, 1]
    timeline = (out / "timeline.txt").read_text()
    for step in ("fault: kill worker of DP rank 1", "API server: group FENCED",
                 "orchestrator: group restart", "orchestrator: group READY"):
        assert step in timeline, timeline
    assert (out / "timeline.png").stat().st_size > 10_000
