"""The main job end to end: `vllm-elastic-ft drill` on a real DP=2 EP deployment.

A worker is SIGSTOPped under load. The survivors fence it out and rebuild the
group in place; the drill then wakes the stopped worker (SIGCONT), which finds
itself in an old epoch and is refused. No accepted request may be lost and the
outputs after recovery must equal those taken before the fault.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_drill_stop_worker_recovers_in_engine_and_refuses_the_stale_rank(tiny_moe_path, tmp_path):
    out = tmp_path / "drill"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_elastic_ft.cli", "drill", "--dp", "2", "--fault", "stop",
         "--requests", "24", "--concurrency", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["requests_sent"] == result["requests_ok"] == 24
    assert result["requests_lost"] == 0
    assert result["outputs_match_reference"] is True
    assert result["recovery"] == "in_engine"
    assert result["report"]["suspects"] == [1] and result["report"]["kind"] == "hung"
    assert 0 < result["fence_s"] <= result["rebuild_s"] <= result["serving_again_s"] < 10
    assert result["final_state"] == "HEALTHY" and result["live_ranks"] == [0]
    assert result["final_epoch"] == 1
    assert result["expert_placement"] == {"0": list(range(8))}
    assert result["stale_rank_refused"] is True
    timeline = (out / "timeline.txt").read_text()
    for step in ("fault: stop worker of DP rank 1", "-> FENCED (epoch 1, ranks [0])",
                 "RebuildDone -> READY (epoch 1, ranks [0])",
                 "Served -> HEALTHY (epoch 1, ranks [0])", "fault: cont rank 1"):
        assert step in timeline, timeline
    assert "orchestrator: group restart" not in timeline
    assert (out / "timeline.png").stat().st_size > 10_000
