"""One recovery core: the harness and the vLLM worker run the same object, and the
layout rules that keep it that way (store keys in one module, injection opt-in)."""

from __future__ import annotations

import pathlib
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

import vllm_elastic_ft
from vllm_elastic_ft.config import ElasticFTConfig
from vllm_elastic_ft.faults.injection import FaultInjection, injection_for
from vllm_elastic_ft.group.member import GroupMember
from vllm_elastic_ft.group.state_machine import (
    ControllerOptions, GroupState, GroupView, PeerFenced, Served, step,
)
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings

PACKAGE = pathlib.Path(vllm_elastic_ft.__file__).parent


@pytest.fixture()
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=5))


def test_store_keys_are_spelled_in_one_module_only():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "keys.py" and "eft/" in p.read_text()]
    assert not offenders, f'"eft/" spelled outside comm/keys.py: {offenders}'


def test_the_harness_and_the_vllm_worker_run_the_same_core(store, monkeypatch):
    from vllm_elastic_ft.testing.elastic_moe_loop import ElasticLoopSpec, ElasticRank
    from vllm_elastic_ft.vllm import worker_group

    address = f"127.0.0.1:{store.port}"
    harness = ElasticRank(0, 1, address, ElasticLoopSpec(),
                          WatchdogSettings(heartbeat_interval_s=0.05))
    watchdog = RankWatchdog(WatchdogSettings(heartbeat_interval_s=0.05), store, "dp", 0, 1)
    monkeypatch.setattr(worker_group, "process_watchdog", lambda rank, world: watchdog)
    worker = worker_group.WorkerGroup(0, 1, store, ElasticFTConfig())
    try:
        assert type(harness.member) is GroupMember and type(worker.member) is GroupMember
        # Neither door keeps a recovery sequence of its own.
        for door in (worker_group.WorkerGroup, ElasticRank):
            for name in ("recover", "rebuild", "_adopt", "_rebuild_while_idle"):
                assert not hasattr(door, name), f"{door.__name__}.{name}: a second recovery core"
    finally:
        harness.watchdog.shutdown()
        harness.member.shutdown()
        watchdog.shutdown()
        worker.member.shutdown()


class RecordingStore:
    """A real store that records every key a caller reads."""

    def __init__(self, store):
        self._store, self.reads = store, []

    def check(self, keys):
        self.reads += list(keys)
        return self._store.check(keys)

    def get(self, key):
        self.reads.append(key)
        return self._store.get(key)

    def multi_get(self, keys):
        self.reads += list(keys)
        return self._store.multi_get(keys)

    def __getattr__(self, name):  # set, add, compare_set, delete_key: writes
        return getattr(self._store, name)


def _tick_a_while(store, injection) -> None:
    watchdog = RankWatchdog(WatchdogSettings(heartbeat_interval_s=0.02), store, "dp", 0, 2,
                            injection=injection)
    from vllm_elastic_ft.watchdog.guarded import run_guarded

    run_guarded(watchdog, "dispatch", lambda seq: None)  # the hot path, once
    time.sleep(0.3)
    watchdog.shutdown()


def test_with_fault_injection_off_no_injection_key_is_ever_read(store):
    recording = RecordingStore(store)
    assert injection_for(ElasticFTConfig(), recording, "dp", 0) is None
    _tick_a_while(recording, injection_for(ElasticFTConfig(), recording, "dp", 0))
    assert recording.reads, "the watchdog read its peers' heartbeats"
    assert not [k for k in recording.reads if "/inject/" in k]


def test_with_fault_injection_on_the_knobs_are_read_and_served(store):
    recording = RecordingStore(store)
    config = ElasticFTConfig.from_dict({"fault_injection": True})
    injection = injection_for(config, recording, "dp", 0)
    assert isinstance(injection, FaultInjection)
    from vllm_elastic_ft import faults

    faults.set_slow(store, "dp", 0, 0.05)
    _tick_a_while(recording, injection)
    assert [k for k in recording.reads if "/inject/slow/0" in k]
    assert injection.slow_delay_s == 0.05


def test_a_fence_by_a_peer_is_an_attempt_too_and_the_state_machine_alone_gives_up():
    options = ControllerOptions(max_rebuilds=2)
    view = GroupView("dp", 4, (0, 1, 2, 3))
    view = step(1.0, view, PeerFenced(1, (3,)), options)
    assert view.state is GroupState.FENCED and view.attempts == 1
    view = step(2.0, view, PeerFenced(2, (2,)), options)
    assert view.state is GroupState.FENCED and view.attempts == 2
    view = step(3.0, view, PeerFenced(3, (1,)), options)
    assert view.state is GroupState.FAILED and "attempts exhausted (2)" in view.reason


def test_a_served_step_resets_the_attempts():
    options = ControllerOptions(max_rebuilds=1)
    view = step(1.0, GroupView("dp", 2, (0, 1)), PeerFenced(1, (1,)), options)
    view = GroupView(**{**view.__dict__, "state": GroupState.READY})  # as after a rebuild
    view = step(2.0, view, Served(1), options)
    assert view.state is GroupState.HEALTHY and view.attempts == 0
    assert step(3.0, view, PeerFenced(2), options).state is GroupState.FENCED


class _Experts:
    def held(self):
        return (0, 1)

    def adopt(self, old, new):
        raise AssertionError("a gang-restart tier must not adopt a new placement")


@pytest.mark.parametrize("backend", ["deepep_high_throughput", "deepep_low_latency"])
def test_a_vllm_worker_on_deepep_fences_and_fails_naming_its_backend(store, monkeypatch, backend):
    from vllm_elastic_ft.comm.transport import RecoveryTier
    from vllm_elastic_ft.group.fencing import current_epoch
    from vllm_elastic_ft.group.member import GroupFailedError
    from vllm_elastic_ft.vllm import worker_group

    watchdog = RankWatchdog(WatchdogSettings(heartbeat_interval_s=0.05), store, "dp", 0, 1)
    monkeypatch.setattr(worker_group, "process_watchdog", lambda rank, world: watchdog)
    worker = worker_group.WorkerGroup(0, 1, store, ElasticFTConfig(), all2all_backend=backend)
    try:
        assert worker.member.transport.recovery_tier is RecoveryTier.GANG_RESTART
        worker.member.attach_experts(_Experts(), 2)
        started = time.monotonic()
        with pytest.raises(GroupFailedError, match=backend):
            worker.member.recover("dispatch missed its deadline")
        assert time.monotonic() - started < 5.0
        assert current_epoch(store, "dp") == 1, "the group is fenced: no request is admitted"
        assert worker.member.controller.view.state is GroupState.FAILED
    finally:
        watchdog.shutdown()
        worker.member.shutdown()


def test_a_vllm_worker_on_cpu_rebuilds_in_place(store, monkeypatch):
    from vllm_elastic_ft.comm.transport import RecoveryTier
    from vllm_elastic_ft.vllm import worker_group

    watchdog = RankWatchdog(WatchdogSettings(heartbeat_interval_s=0.05), store, "dp", 0, 1)
    monkeypatch.setattr(worker_group, "process_watchdog", lambda rank, world: watchdog)
    worker = worker_group.WorkerGroup(0, 1, store, ElasticFTConfig())
    try:
        assert worker.member.transport.recovery_tier is RecoveryTier.REBUILD_IN_PLACE
    finally:
        watchdog.shutdown()
        worker.member.shutdown()
