"""The Ray Serve adapter's pure parts: the LLMConfig it builds, and the routing rule.

(The adapter on real Ray Serve with real vLLM gangs: tests/test_e2e_ray_serve.py.)
"""

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve.llm")

from ray.serve.llm import LLMConfig  # noqa: E402

from vllm_elastic_ft.config import ElasticFTConfigError  # noqa: E402
from vllm_elastic_ft.ray_serve.builder import ROUTER_CLASS, prepare_llm_config  # noqa: E402
from vllm_elastic_ft.ray_serve.router import GangAwareRequestRouter, replica_serves  # noqa: E402


def _config(**engine_kwargs) -> LLMConfig:
    return LLMConfig(model_loading_config={"model_id": "m", "model_source": "/tmp/m"},
                     accelerator_config={"kind": "cpu"},
                     engine_kwargs={"data_parallel_size": 2, **engine_kwargs},
                     runtime_env={"env_vars": {"VLLM_PLUGINS": "other"}})


def test_plugin_is_switched_on_through_runtime_env_and_additional_config():
    original = _config(additional_config={"elastic_ft": {"deadline_s": 2.0}})
    prepared = prepare_llm_config(original)
    assert prepared.runtime_env["env_vars"]["VLLM_PLUGINS"] == "other,elastic_ft"
    ft = prepared.engine_kwargs["additional_config"]["elastic_ft"]
    assert ft["deadline_s"] == 2.0 and ft["in_engine_rebuild"] is True
    router = prepared.deployment_config["request_router_config"]
    assert router["request_router_class"] == ROUTER_CLASS
    # The caller's config is not modified.
    assert original.runtime_env["env_vars"]["VLLM_PLUGINS"] == "other"
    assert "request_router_config" not in (original.deployment_config or {})


def test_a_bad_setting_fails_when_the_app_is_built():
    with pytest.raises(ElasticFTConfigError, match="deadline_s"):
        prepare_llm_config(_config(additional_config={"elastic_ft": {"deadline_s": -1}}))
    with pytest.raises(ElasticFTConfigError, match="no_such_key"):
        prepare_llm_config(_config(additional_config={"elastic_ft": {"no_such_key": 1}}))


def test_router_skips_replicas_of_gangs_that_do_not_serve():
    assert replica_serves(None) and replica_serves({}) and replica_serves({"elastic_ft": {}})
    replicas = [SimpleNamespace(name=f"r{i}", routing_stats={"elastic_ft": {"serving": i % 2 == 0}})
                for i in range(6)]
    router = GangAwareRequestRouter.__new__(GangAwareRequestRouter)
    for _ in range(20):
        (chosen,) = asyncio.run(router.choose_replicas(replicas))
        assert len(chosen) == 2 and all(r.routing_stats["elastic_ft"]["serving"] for r in chosen)
    nobody = [SimpleNamespace(routing_stats={"elastic_ft": {"serving": False}})] * 2
    assert asyncio.run(router.choose_replicas(nobody)) == []


def test_gang_autoscaling_is_left_as_ray_builds_it(tiny_moe_path):
    """Autoscaling in DP groups (Ray turns min/max groups into replicas, gang_size apart)
    comes out of our builder exactly as out of Ray's own build_dp_deployment: the adapter
    changes the replica class and the request router, nothing Ray scales or schedules by."""
    from ray.serve.llm import build_dp_deployment

    from vllm_elastic_ft.ray_serve.builder import build_elastic_dp_deployment

    def config():
        return LLMConfig(model_loading_config={"model_id": "m", "model_source": tiny_moe_path},
                         accelerator_config={"kind": "cpu"},
                         engine_kwargs={"data_parallel_size": 2, "enable_expert_parallel": True},
                         deployment_config={"autoscaling_config": {
                             "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}})

    ours, stock = (app._bound_deployment for app in (build_elastic_dp_deployment(config()),
                                                     build_dp_deployment(config())))
    assert ours.func_or_class.__name__ == "ElasticDPServer"
    ours_config, stock_config = ours._deployment_config, stock._deployment_config
    assert ours_config.autoscaling_config == stock_config.autoscaling_config
    assert (ours_config.autoscaling_config.min_replicas,
            ours_config.autoscaling_config.max_replicas) == (2, 6)  # 1-3 gangs of 2
    assert ours_config.gang_scheduling_config == stock_config.gang_scheduling_config
    assert ours_config.gang_scheduling_config.gang_size == 2
    mine, theirs = ours_config.model_dump(), stock_config.model_dump()
    differing = {k for k in mine if mine[k] != theirs[k]}
    assert differing <= {"request_router_config", "version", "user_configured_option_names"}, \
        differing
