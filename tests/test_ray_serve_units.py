"""The Ray Serve adapter's pure parts: the LLMConfig it builds, and the routing rule.

(The adapter on real Ray Serve with real vLLM gangs: tests/test_e2e_ray_serve.py.)
"""

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve.llm")

from ray.serve.llm import LLMConfig  # noqa: E402

from vllm_elastic_ft.config import ElasticFTConfig, ElasticFTConfigError  # noqa: E402
from vllm_elastic_ft.group.state_machine import GroupState, GroupView  # noqa: E402
from vllm_elastic_ft.ray_serve.builder import ROUTER_CLASS, prepare_llm_config  # noqa: E402
from vllm_elastic_ft.ray_serve.router import GangAwareRequestRouter, replica_serves  # noqa: E402
from vllm_elastic_ft.ray_serve.server import ElasticDPServer  # noqa: E402


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
    with pytest.raises(ElasticFTConfigError, match=r"deadline_s must be a finite number.*got nan"):
        prepare_llm_config(_config(additional_config={"elastic_ft": {"deadline_s": float("nan")}}))


def test_min_live_ranks_above_the_gang_size_fails_when_the_app_is_built():
    with pytest.raises(ElasticFTConfigError) as err:
        prepare_llm_config(_config(additional_config={"elastic_ft": {"min_live_ranks": 3}}))
    for fragment in ["elastic_ft.min_live_ranks (3)", "data_parallel_size (2)"]:
        assert fragment in str(err.value)
    # Equal to the gang size: accepted (any lost rank is FAILED, never a smaller gang).
    prepared = prepare_llm_config(_config(additional_config={"elastic_ft": {"min_live_ranks": 2}}))
    assert prepared.engine_kwargs["additional_config"]["elastic_ft"]["min_live_ranks"] == 2
    # No data_parallel_size in engine_kwargs: Ray's DP size is 1.
    single = LLMConfig(model_loading_config={"model_id": "m", "model_source": "/tmp/m"},
                       accelerator_config={"kind": "cpu"},
                       engine_kwargs={"additional_config": {"elastic_ft": {"min_live_ranks": 2}}})
    with pytest.raises(ElasticFTConfigError,
                       match=r"min_live_ranks \(2\).*data_parallel_size \(1\)"):
        prepare_llm_config(single)


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


class _Replica(ElasticDPServer):
    def __del__(self):  # Ray's LLMServer.__del__ is a coroutine; this replica has no engine
        pass


def _replica(state: GroupState, rank: int = 1, since_s_ago: float = 0.0, live=(0,),
             engine_healthy: bool = True, **ft) -> _Replica:
    """An ElasticDPServer whose gang view and engine health are given (no Ray, no engine)."""
    import time

    replica = _Replica.__new__(_Replica)
    view = GroupView("g", 2, tuple(live), state=state, since=time.time() - since_s_ago,
                     reason="rank(s) [1] dead")
    replica._ft_group = SimpleNamespace(controller=SimpleNamespace(view=view))
    replica._ft_config = ElasticFTConfig(**ft)
    replica._ft_gang, replica._ft_rank = "gang-a", rank
    replica.engine = None
    replica.engine_checked = []
    replica._ft_forwarding, replica._ft_drain_started = 0, None

    async def engine_check():  # stands for DPServer.check_health (the engine's own check)
        replica.engine_checked.append(True)
        if not engine_healthy:
            raise RuntimeError("engine dead")

    replica._engine_check = engine_check
    return replica


@pytest.fixture()
def engine_check(monkeypatch):
    from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer

    async def check(self):
        await self._engine_check()

    monkeypatch.setattr(DPServer, "check_health", check)


def _healthy(replica) -> bool:
    try:
        asyncio.run(replica.check_health())
        return True
    except RuntimeError:
        return False


def test_health_stays_green_while_the_gang_heals_in_place(engine_check):
    for state in (GroupState.FENCED, GroupState.REBUILDING):
        # The lost rank's own replica too: Ray must not restart the gang over it.
        assert _healthy(_replica(state, engine_healthy=False, rebuild_budget_s=20.0))
        assert not _healthy(_replica(state, since_s_ago=21.0, rebuild_budget_s=20.0))


def test_a_rebuilt_gang_that_saw_no_traffic_never_ages_into_a_restart(engine_check):
    # READY for much longer than the budget (no request came since the rebuild): it can
    # serve, so it is healthy, on a survivor and on the lost rank's replica alike.
    assert _healthy(_replica(GroupState.READY, rank=0, live=(0,), since_s_ago=600.0,
                             rebuild_budget_s=20.0))
    assert _healthy(_replica(GroupState.READY, rank=1, live=(0,), engine_healthy=False,
                             since_s_ago=600.0, rebuild_budget_s=20.0))
    # ... but a survivor whose engine died after the rebuild is judged by its engine.
    assert not _healthy(_replica(GroupState.READY, rank=1, live=(0, 1), engine_healthy=False,
                                 since_s_ago=1.0, rebuild_budget_s=20.0))
    assert not _healthy(_replica(GroupState.FAILED))
    # Healed without this rank: its replica only forwards, and stays up.
    assert _healthy(_replica(GroupState.HEALTHY, rank=1, live=(0,), engine_healthy=False))
    # A dead engine the gang did not heal around: Ray's gang restart.
    assert not _healthy(_replica(GroupState.HEALTHY, rank=1, live=(0, 1), engine_healthy=False))


def test_a_gang_restart_waits_for_the_requests_a_dead_replica_still_forwards(engine_check):
    """A replica whose engine died (nothing healed around it) streams the requests it sent to
    another gang through itself: Ray's gang restart would cut them. Its health check waits
    while they run, for at most rebuild_budget_s, then asks for the restart."""
    replica = _replica(GroupState.HEALTHY, rank=1, live=(0, 1), engine_healthy=False,
                       rebuild_budget_s=20.0)
    replica._ft_forwarding = 2
    assert _healthy(replica), "two forwarded streams are still running"
    replica._ft_drain_started -= 21.0  # the budget is spent
    assert not _healthy(replica)
    replica._ft_forwarding, replica._ft_drain_started = 0, None
    assert not _healthy(replica), "nothing in flight: the restart at once"


def test_with_rebuild_off_a_fenced_gang_asks_for_its_restart_at_once(engine_check):
    for state in (GroupState.FENCED, GroupState.REBUILDING, GroupState.READY):
        assert not _healthy(_replica(state, in_engine_rebuild=False))
    assert not _healthy(_replica(GroupState.FAILED, in_engine_rebuild=False))
    # Not fenced: the engine's own check decides, whatever the view's live ranks say.
    assert _healthy(_replica(GroupState.HEALTHY, live=(0, 1), in_engine_rebuild=False))
    assert _healthy(_replica(GroupState.SUSPECT, live=(0, 1), in_engine_rebuild=False))
    assert not _healthy(_replica(GroupState.HEALTHY, live=(0,), engine_healthy=False,
                                 in_engine_rebuild=False))
