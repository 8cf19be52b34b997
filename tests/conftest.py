import os

import pytest

# Test runs never reach a model hub; the tiny checkpoint is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _no_exported_plugin_config():
    """A test that builds an engine config exports it (as a front end does); later tests
    in the same process must not inherit it."""
    yield
    from vllm_elastic_ft.vllm import process_config

    os.environ.pop(process_config.CONFIG_ENV, None)
    process_config.reset_process_config()


def serve_on_simulated_nodes(tiny_moe_path: str, log_dir, dp: int, num_nodes: int):
    """A module fixture's body for the node e2e tests: the tiny MoE at DP=``dp`` with EP over
    ``num_nodes`` simulated nodes (an equal share of ranks each; vLLM's headless launcher on
    every node but the head), yielded once it serves. Skips, saying why, where the machine
    cannot make namespaces."""
    from vllm_elastic_ft.testing import nodes as simulated
    from vllm_elastic_ft.testing.multinode import MultiNodeServer
    from vllm_elastic_ft.testing.server import ServerSpec

    why = simulated.unavailable()
    if why:
        pytest.skip(why)
    # heartbeat_stale_s 5 (default 2): on this 2-core box a live rank's watcher stalls for
    # 1.1-2.2 s while a replacement engine starts on its node (the watchdog logs "could not
    # reach the store for ..."), and a stall longer than heartbeat_stale_s names a live
    # rank hung, by design. Deaths are still named at once (node agent, node-mate's /proc).
    spec = ServerSpec(tiny_moe_path, data_parallel_size=dp, expert_parallel=True,
                      extra_args=["--elastic-ft-deadline-s", "2",
                                  "--elastic-ft-heartbeat-stale-s", "5",
                                  "--elastic-ft-rebuild-budget-s", "20"])
    with simulated.SimulatedNodes(num_nodes) as nodes, \
            MultiNodeServer(nodes, spec, dp // num_nodes, log_dir) as server:
        server.wait_ready(900)
        yield server


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
