import os

import pytest

# Test runs never reach a model hub; the tiny checkpoint is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_moe_path() -> str:
    from vllm_elastic_ft.testing.tiny_moe import build_tiny_moe

    return str(build_tiny_moe())


@pytest.fixture(scope="session")
def reference_tokens(tiny_moe_path, tmp_path_factory) -> list[list[int]]:
    """Greedy tokens of the e2e prompts from a DP=1 server (taken once per session)."""
    from test_e2e_serving import _greedy

    from vllm_elastic_ft.testing.server import ServerSpec, VLLMServer

    log = tmp_path_factory.mktemp("dp1") / "server.log"
    with VLLMServer(ServerSpec(tiny_moe_path, data_parallel_size=1), log) as server:
        server.wait_ready()
        return _greedy(server)
