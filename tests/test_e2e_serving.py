"""CPU wide-EP through real vLLM servers: DP+EP serves the same greedy tokens as DP=1.

Each server is a real ``vllm.entrypoints.openai.api_server`` with the plugin on
the tiny float32 MoE. Start-ups dominate (tens of seconds each on 2 cores), so
the DP=1 reference is taken once per session.
"""

import re
import subprocess
import sys

import pytest

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


@pytest.fixture(scope="session")
def reference_tokens(tiny_moe_path, tmp_path_factory) -> list[list[int]]:
    log = tmp_path_factory.mktemp("dp1") / "server.log"
    with VLLMServer(ServerSpec(tiny_moe_path, data_parallel_size=1), log) as server:
        server.wait_ready()
        return _greedy(server)


@pytest.mark.parametrize("dp", [2, 4])
def test_dp_ep_matches_dp1_and_shards_experts(dp, tiny_moe_path, reference_tokens, tmp_path):
    spec = ServerSpec(tiny_moe_path, data_parallel_size=dp, expert_parallel=True)
    with VLLMServer(spec, tmp_path / "server.log") as server:
        server.wait_ready()
        assert _greedy(server) == reference_tokens
        log = server.log_text()

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
