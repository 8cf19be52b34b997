"""The group state machine: every transition, with the clock passed in."""

from dataclasses import replace


from vllm_elastic_ft.group.controller import GroupController
from vllm_elastic_ft.group.state_machine import (
    ControllerOptions, Fault, GroupState, GroupView, JoinRequested, RebuildDone, RebuildFailed,
    RebuildStarted, Served, Tick, step,
)

OPTS = ControllerOptions(rebuild_budget_s=10.0, max_rebuilds=2, min_live_ranks=2, slow_strikes=2)
S = GroupState


def _view(**kw) -> GroupView:
    return replace(GroupView("g", 4, (0, 1, 2, 3)), **kw)


def test_dead_rank_fences_at_once_and_bumps_the_epoch():
    v = step(1.0, _view(), Fault(0, (2,), "dead", 0), OPTS)
    assert v.state is S.FENCED and v.epoch == 1 and v.live_ranks == (0, 1, 3)
    assert not v.serving and "rank(s) [2] dead" in v.reason and v.since == 1.0


def test_full_recovery_path_back_to_healthy():
    v = step(1.0, _view(), Fault(0, (1,), "hung"), OPTS)
    v = step(1.1, v, RebuildStarted(1), OPTS)
    assert v.state is S.REBUILDING and v.rebuild_started_at == 1.1 and not v.serving
    v = step(2.0, v, RebuildDone(1, (0, 2, 3)), OPTS)
    assert v.state is S.READY and v.serving
    v = step(2.1, v, Served(1), OPTS)
    assert v.state is S.HEALTHY and v.attempts == 0 and v.suspects == ()


def test_slow_needs_strikes_before_fencing():
    v = step(1.0, _view(), Fault(0, (3,), "slow"), OPTS)
    assert v.state is S.SUSPECT and v.epoch == 0 and v.serving
    v = step(2.0, v, Fault(0, (3,), "slow"), OPTS)
    assert v.state is S.FENCED and v.epoch == 1 and v.live_ranks == (0, 1, 2)


def test_repeated_reports_of_one_fault_fence_once():
    v = step(1.0, _view(), Fault(0, (2,), "dead", 0), OPTS)
    again = step(1.01, v, Fault(0, (2,), "dead", 1), OPTS)
    assert again is v
    stale = step(1.02, v, Fault(0, (2,), "dead", 3), OPTS)
    assert stale is v


def test_second_fault_during_rebuild_refences_then_fails_when_attempts_run_out():
    v = step(1.0, _view(), Fault(0, (2,), "dead"), OPTS)
    v = step(1.1, v, RebuildStarted(1), OPTS)
    v = step(1.5, v, Fault(1, (3,), "dead"), OPTS)
    assert v.state is S.FENCED and v.epoch == 2 and v.live_ranks == (0, 1)
    v = step(1.6, v, RebuildStarted(2), OPTS)
    v = step(1.7, v, Fault(2, (1,), "dead"), replace(OPTS, min_live_ranks=1))
    assert v.state is S.FAILED and "attempts exhausted (2)" in v.reason


def test_too_few_live_ranks_fails():
    v = step(1.0, _view(live_ranks=(0, 1)), Fault(0, (1,), "dead"), OPTS)
    assert v.state is S.FAILED and "min_live_ranks=2" in v.reason


def test_rebuild_over_budget_fails_on_tick_and_failed_is_terminal():
    v = step(1.0, _view(), Fault(0, (2,), "dead"), OPTS)
    v = step(1.0, v, RebuildStarted(1), OPTS)
    assert step(10.5, v, Tick(), OPTS) is v
    v = step(11.5, v, Tick(), OPTS)
    assert v.state is S.FAILED and "budget of 10.0s" in v.reason
    assert step(12.0, v, RebuildDone(1, (0, 1, 3)), OPTS) is v


def test_rebuild_failure_and_events_of_other_epochs():
    v = step(1.0, _view(), Fault(0, (2,), "dead"), OPTS)
    assert step(1.1, v, RebuildStarted(0), OPTS) is v  # wrong epoch: ignored
    assert step(1.2, v, RebuildFailed(1, "no peers"), OPTS).state is S.FAILED


def test_join_fences_and_adds_the_rank():
    v = _view(live_ranks=(0, 1, 3))
    v = step(1.0, v, JoinRequested(2), OPTS)
    assert v.state is S.FENCED and v.epoch == 1 and v.live_ranks == (0, 1, 2, 3)


class RecordingHook:
    def __init__(self):
        self.calls = []

    def on_fenced(self, view, report):
        self.calls.append(("fenced", view.epoch, report["kind"] if report else None))

    def on_ready(self, view):
        self.calls.append(("ready", view.epoch))

    def on_failed(self, view, reason):
        self.calls.append(("failed", view.epoch))


def test_controller_logs_every_transition_and_calls_the_hook_once_per_state():
    clock = iter(range(100)).__next__
    hook = RecordingHook()
    c = GroupController("g", 4, OPTS, hook, clock=lambda: float(clock()))
    report = {"epoch": 0, "suspects": [2], "kind": "dead", "reporter": 0}
    c.fault(report)
    c.fault({**report, "reporter": 1})
    c.handle(RebuildStarted(1))
    c.handle(RebuildDone(1, (0, 1, 3)))
    c.handle(Served(1))
    assert hook.calls == [("fenced", 1, "dead"), ("ready", 1)]
    assert [e["state"] for e in c.events] == ["HEALTHY", "FENCED", "REBUILDING", "READY", "HEALTHY"]
    assert all({"group", "epoch", "rank", "event", "reason", "t"} <= e.keys() for e in c.events)
    status = c.status()
    assert status["state"] == "HEALTHY" and status["epoch"] == 1 and status["last_report"]["reporter"] == 1


def test_a_failing_hook_does_not_stop_the_controller():
    class Broken(RecordingHook):
        def on_fenced(self, view, report):
            raise RuntimeError("orchestrator bug")

    c = GroupController("g", 4, OPTS, Broken())
    assert c.fault({"epoch": 0, "suspects": [1], "kind": "dead"}).state is S.FENCED


def test_peer_fence_moves_to_its_epoch_once():
    from vllm_elastic_ft.group.state_machine import PeerFenced

    v = step(1.0, _view(), PeerFenced(2, (3,)), OPTS)
    assert v.state is S.FENCED and v.epoch == 2 and v.live_ranks == (0, 1, 2)
    assert step(1.1, v, PeerFenced(2), OPTS) is v
