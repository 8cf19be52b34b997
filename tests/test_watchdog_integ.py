"""The rank watchdog on 4 real gloo ranks looping a real MoE layer, with real signals.

Each rank runs dispatch -> experts -> combine (``testing/moe_loop.py``) under
its watchdog; heartbeats live in a TCPStore the test process hosts. Faults are
injected with the same tool a user has (``vllm_elastic_ft.faults``).
"""

import time

import pytest

from vllm_elastic_ft import faults
from vllm_elastic_ft.testing.harness import RankGroup
from vllm_elastic_ft.testing.moe_loop import MoELoopSpec, run_moe_loop
from vllm_elastic_ft.watchdog.rank_watchdog import WatchdogSettings

WORLD = 4
WARMUP_CALLS = 10  # 5 steps (a dispatch and a combine each)
DEADLINE_S = 1.0


def _settings(**over) -> WatchdogSettings:
    base = dict(deadline_s=DEADLINE_S, warmup_calls=WARMUP_CALLS, warmup_deadline_s=0.0,
                heartbeat_interval_s=0.05, heartbeat_stale_s=2.0)
    return WatchdogSettings(**{**base, **over})


def _past_warmup(group: RankGroup, step: int = 8) -> None:
    for r in range(WORLD):
        group.wait_key(f"loop/step/{r}")
    deadline = time.monotonic() + 60
    while min(int(group.store.get(f"loop/step/{r}")) for r in range(WORLD)) < step:
        assert time.monotonic() < deadline, "ranks did not progress"
        time.sleep(0.02)


def _first_report_on(result: dict, suspect: int) -> dict:
    matching = [r for r in result["reports"] if suspect in r["suspects"]]
    assert matching, f"rank {result['rank']} named nobody: {result}"
    return matching[0]


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_sigkill_rank_is_named_dead_by_every_survivor_within_1s(native):
    victim = 2
    with RankGroup(run_moe_loop, WORLD, MoELoopSpec(), _settings(prefer_native=native)) as group:
        _past_warmup(group)
        injection = faults.signal_process("kill", group.pids[victim], victim)
        results = group.results([r for r in range(WORLD) if r != victim], timeout_s=60)
    for rank, result in results.items():
        assert result["backend"] == ("native" if native else "python")
        assert result["fault"] is not None, "survivors must leave the broken collective"
        report = _first_report_on(result, victim)
        assert report["kind"] == "dead" and tuple(report["suspects"]) == (victim,)
        assert report["reporter"] == rank and report["group"] == "harness" and report["epoch"] == 0
        assert report["detected_at"] - injection.at < 1.0, report


def test_sigstop_rank_is_named_hung_within_deadline_plus_half_a_second():
    victim = 1
    with RankGroup(run_moe_loop, WORLD, MoELoopSpec(), _settings()) as group:
        _past_warmup(group)
        injection = faults.signal_process("stop", group.pids[victim], victim)
        try:
            results = group.results([r for r in range(WORLD) if r != victim], timeout_s=60)
        finally:
            faults.signal_process("cont", group.pids[victim], victim)
    for rank, result in results.items():
        report = _first_report_on(result, victim)
        assert report["kind"] == "hung" and tuple(report["suspects"]) == (victim,)
        assert report["detected_at"] - injection.at < DEADLINE_S + 0.5, report


def test_delay_above_deadline_is_named_slow():
    victim = 3
    spec = MoELoopSpec(steps=40)
    with RankGroup(run_moe_loop, WORLD, spec, _settings()) as group:
        _past_warmup(group)
        faults.set_slow(group.store, spec.group, victim, DEADLINE_S + 0.5)
        results = group.results(timeout_s=120)
    peers = [results[r] for r in range(WORLD) if r != victim]
    kinds = {r["kind"] for p in peers for r in p["reports"] if victim in r["suspects"]}
    assert kinds == {"slow"}, peers
    # The monitor's miss and the bounded wait's timeout are the same deadline:
    # whichever lands first carries the report, never a closed connection.
    assert all(r["trigger"] in ("deadline", "collective_error") for p in peers for r in p["reports"])
    assert all(p["fault"]["peer_closed"] is False for p in peers)


def test_delay_below_deadline_is_no_fault():
    spec = MoELoopSpec(steps=30)
    with RankGroup(run_moe_loop, WORLD, spec, _settings()) as group:
        faults.set_slow(group.store, spec.group, 3, DEADLINE_S * 0.4)
        results = group.results(timeout_s=120)
    for result in results.values():
        assert result["fault"] is None and result["steps"] == spec.steps
        assert result["reports"] == []


def test_delay_during_warmup_grace_is_no_fault():
    spec = MoELoopSpec(steps=3)
    # Every call of these 3 steps is in warm-up; the delay is past the steady deadline.
    with RankGroup(run_moe_loop, WORLD, spec, _settings(warmup_calls=100)) as group:
        faults.set_slow(group.store, spec.group, 0, DEADLINE_S + 0.5)
        results = group.results(timeout_s=120)
    for result in results.values():
        assert result["fault"] is None and result["steps"] == spec.steps
        assert result["reports"] == []
