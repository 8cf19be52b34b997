"""Recovery tiers per transport, and the core's DeepEP path (fence, then FAILED) end to end.

DeepEP cannot run on a CPU machine: a recording stand-in of ``deep_ep.Buffer``
takes its place. The store and the recovery core are real; the watchdog is a
stand-in with only the attributes ``GroupMember`` touches. The gloo rebuild
in place is covered by the harness integration tests, not here.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.deepep_transport import (
    DeepEPTransport, recovery_tier_for_backend, transport_for_all2all_backend,
)
from vllm_elastic_ft.comm.transport import GlooTransport, RecoveryTier, tier_for
from vllm_elastic_ft.group.fencing import current_epoch
from vllm_elastic_ft.group.member import GroupFailedError, GroupMember, MemberOptions
from vllm_elastic_ft.group.state_machine import GroupState
from vllm_elastic_ft.watchdog.report import RankFaultError

#: The end-to-end gang path must end well within this (report wait 0.2 s + store calls).
BOUND_S = 2.0


# ------------------------------------------------------------- stand-ins
class RecordingBuffer:
    """deep_ep.Buffer's call surface: records every call, never talks to a peer."""

    def __init__(self, rank: int = 0, group_size: int = 2, masked: tuple[int, ...] = ()):
        self.rank, self.group_size = rank, group_size
        self.calls: list[tuple[str, tuple, dict]] = []
        self.mask = torch.zeros(group_size, dtype=torch.int32)
        for r in masked:
            self.mask[r] = 1

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        self.calls.append((name, args, kwargs))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def _hook(self, name: str):
        return lambda: self._record(name, (), {})

    def get_dispatch_layout(self, *args, **kwargs):
        self._record("get_dispatch_layout", args, kwargs)
        return "per_rank", "per_rdma_rank", "per_expert", "in_rank", "event"

    def dispatch(self, *args, **kwargs):
        self._record("dispatch", args, kwargs)
        return "recv_x", "recv_idx", "recv_w", [1], "handle", "event"

    def combine(self, *args, **kwargs):
        self._record("combine", args, kwargs)
        return "combined_x", None, "event"

    def low_latency_dispatch(self, *args, **kwargs):
        self._record("low_latency_dispatch", args, kwargs)
        return "recv_x", "handle", "event", self._hook("ll_dispatch_hook")

    def low_latency_combine(self, *args, **kwargs):
        self._record("low_latency_combine", args, kwargs)
        return "combined_x", "handle", "event", self._hook("ll_combine_hook")

    def clean_low_latency_buffer(self, *args, **kwargs):
        self._record("clean_low_latency_buffer", args, kwargs)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        self._record("low_latency_query_mask_buffer", (), {})
        mask_status.copy_(self.mask.to(mask_status.device, mask_status.dtype))

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._record("low_latency_update_mask_buffer", (rank_to_mask, mask), {})
        self.mask[rank_to_mask] = int(mask)

    def low_latency_clean_mask_buffer(self) -> None:
        self._record("low_latency_clean_mask_buffer", (), {})
        self.mask.zero_()

    def destroy(self) -> None:
        self._record("destroy", (), {})


class StubSink:
    def __init__(self):
        self.reports: list = []


class StubWatchdog:
    """The attributes of a RankWatchdog that GroupMember touches, and nothing else."""

    def __init__(self):
        self.after_tick = None
        self.epoch = 0
        self.group_epoch = 0
        self.sink = StubSink()
        self.reconfigured: list[tuple] = []

    def peer_failed(self) -> bool:
        return False

    def peer_named(self) -> bool:
        return False

    def silent_peers(self) -> list[int]:
        return []

    def reconfigure(self, *args) -> None:
        self.reconfigured.append(args)


class StubExperts:
    def __init__(self):
        self.adopted: list[tuple] = []

    def held(self) -> tuple[int, ...]:
        return (0, 1)

    def adopt(self, old, new) -> list[int]:
        self.adopted.append((old, new))
        return []


class ClaimsMaskedContinue:
    name = "claims_masked_continue"
    recovery_tier = RecoveryTier.MASKED_CONTINUE


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


# ---------------------------------------------------------------- (a) tiers
def test_gloo_rebuilds_in_place():
    assert tier_for(GlooTransport.over(object())) is RecoveryTier.REBUILD_IN_PLACE


def test_an_unrun_masked_continue_claim_is_a_gang_restart():
    assert tier_for(ClaimsMaskedContinue()) is RecoveryTier.GANG_RESTART


@pytest.mark.parametrize("mode", ["high_throughput", "low_latency"])
def test_deepep_is_a_gang_restart(mode):
    transport = DeepEPTransport(RecordingBuffer(), mode)
    assert transport.name == f"deepep_{mode}"
    assert transport.recovery_tier is RecoveryTier.GANG_RESTART
    assert tier_for(transport) is RecoveryTier.GANG_RESTART


@pytest.mark.parametrize("backend, tier, why", [
    ("allgather_reducescatter", RecoveryTier.REBUILD_IN_PLACE, "in place"),
    ("deepep_high_throughput", RecoveryTier.GANG_RESTART, "DeepEP"),
    ("deepep_low_latency", RecoveryTier.GANG_RESTART, "DeepEP"),
    ("pplx", RecoveryTier.GANG_RESTART, "no recovery tier is verified"),
    ("nixl_ep", RecoveryTier.GANG_RESTART, "no recovery tier is verified"),
    ("naive", RecoveryTier.GANG_RESTART, "no recovery tier is verified"),
])
def test_recovery_tier_for_backend(backend, tier, why):
    got, reason = recovery_tier_for_backend(backend)
    assert got is tier
    assert backend in reason and why in reason


def test_transport_for_all2all_backend():
    assert transport_for_all2all_backend("allgather_reducescatter") == "gloo"
    assert transport_for_all2all_backend("deepep_low_latency") == "deepep_low_latency"
    assert transport_for_all2all_backend("pplx", RecordingBuffer()) == "pplx"
    transport = transport_for_all2all_backend("deepep_low_latency", RecordingBuffer())
    assert isinstance(transport, DeepEPTransport) and transport.name == "deepep_low_latency"


# ------------------------------------------------------- (b) the transport
def test_high_throughput_forwards_one_to_one():
    inner = RecordingBuffer()
    transport = DeepEPTransport(inner, "high_throughput")
    out = transport.dispatch("x", handle=None, topk_idx="ids", timeout=timedelta(seconds=1),
                             cancelled=lambda: False)
    assert out == ("recv_x", "recv_idx", "recv_w", [1], "handle", "event")
    assert transport.combine("y", "handle", topk_weights="w") == ("combined_x", None, "event")
    assert inner.calls == [("dispatch", ("x",), {"handle": None, "topk_idx": "ids"}),
                           ("combine", ("y", "handle"), {"topk_weights": "w"})]


def test_low_latency_forwards_one_to_one_and_waits_for_the_hook():
    inner = RecordingBuffer()
    transport = DeepEPTransport(inner, "low_latency")
    out = transport.dispatch("x", "ids", 128, 8, return_recv_hook=True)
    assert out == ("recv_x", "handle", "event")
    assert inner.calls[:2] == [("low_latency_dispatch", ("x", "ids", 128, 8),
                                {"return_recv_hook": True}), ("ll_dispatch_hook", (), {})]
    out = transport.combine("x", "ids", "w", "handle", return_recv_hook=True)
    assert out == ("combined_x", "handle", "event")
    assert inner.names()[2:] == ["low_latency_combine", "ll_combine_hook"]


def test_a_cancelled_call_launches_nothing():
    inner = RecordingBuffer()
    transport = DeepEPTransport(inner, "high_throughput")
    with pytest.raises(RuntimeError, match="cancelled"):
        transport.dispatch("x", cancelled=lambda: True)
    assert inner.calls == []


def test_silent_ranks_read_the_low_latency_mask():
    inner = RecordingBuffer(group_size=4, masked=(2,))
    assert DeepEPTransport(inner, "low_latency").silent_ranks() == [2]
    inner.low_latency_update_mask_buffer(3, True)
    assert DeepEPTransport(inner, "low_latency").silent_ranks() == [2, 3]
    inner.low_latency_clean_mask_buffer()
    assert DeepEPTransport(inner, "low_latency").silent_ranks() == []
    assert DeepEPTransport(RecordingBuffer(masked=(1,)), "high_throughput").silent_ranks() == []


def test_all_reduce_is_not_a_deepep_operation():
    with pytest.raises(NotImplementedError, match="vLLM's own DP group"):
        DeepEPTransport(RecordingBuffer()).all_reduce(torch.zeros(1), None, None)


@pytest.mark.parametrize("mode", ["high_throughput", "low_latency"])
def test_abort_never_destroys_and_later_calls_raise(mode):
    inner = RecordingBuffer()
    transport = DeepEPTransport(inner, mode)
    transport.abort()
    transport.shutdown()
    assert transport.aborted and transport.buffer is None
    for call in (lambda: transport.dispatch("x"), lambda: transport.combine("x"),
                 lambda: transport.all_reduce(torch.zeros(1), None, None)):
        with pytest.raises(RuntimeError, match="aborted"):
            call()
    assert "destroy" not in inner.names() and inner.calls == []
    assert transport.silent_ranks() == []


def test_configure_accepts_only_the_buffer_vllm_built():
    transport = DeepEPTransport(RecordingBuffer(rank=1, group_size=2))
    transport.configure(0, 1, 2)
    with pytest.raises(RuntimeError, match="deepep_high_throughput.*gang_restart"):
        transport.configure(1, 1, 2)
    with pytest.raises(RuntimeError, match="rank 1 of 2"):
        transport.configure(0, 0, 2)


# ------------------------------------------- (c) the core's DeepEP path
class _Member:
    """A GroupMember over DeepEP with its stand-ins, and what they recorded."""

    def __init__(self, store):
        self.buffer = RecordingBuffer(rank=0, group_size=2)
        self.transport = DeepEPTransport(self.buffer, "high_throughput")
        self.configured: list[tuple[int, int, int]] = []
        configure = self.transport.configure

        def recording_configure(epoch: int, rank: int, world_size: int) -> None:
            self.configured.append((epoch, rank, world_size))
            configure(epoch, rank, world_size)

        self.transport.configure = recording_configure
        self.watchdog = StubWatchdog()
        self.experts = StubExperts()
        self.member = GroupMember(0, 2, store, self.watchdog, self.transport,
                                  MemberOptions(report_wait_s=0.2), group="dp")
        self.member.attach_experts(self.experts, num_experts=4)

    def assert_fenced_and_failed(self, store, err: GroupFailedError, took_s: float) -> None:
        assert "deepep_high_throughput" in str(err) and "gang" in str(err)
        assert took_s < BOUND_S
        assert current_epoch(store, "dp") == 1
        assert self.member.controller.view.state is GroupState.FAILED
        assert store.check([keys.failed("dp", 1)])
        assert "deepep_high_throughput" in store.get(keys.failed("dp", 1)).decode()
        assert "destroy" not in self.buffer.names()
        assert self.transport.aborted
        assert self.configured == [(0, 0, 2)], "no communicator of epoch 1"
        assert self.experts.adopted == [] and self.watchdog.reconfigured == []


def test_recover_on_deepep_fences_then_fails(store):
    m = _Member(store)
    started = time.monotonic()
    with pytest.raises(GroupFailedError) as err:
        m.member.recover("deadline in dispatch")
    m.assert_fenced_and_failed(store, err.value, time.monotonic() - started)


def test_a_rank_fault_in_a_step_on_deepep_ends_in_failed(store):
    m = _Member(store)
    attempts: list[bool] = []

    def attempt(retry: bool):
        attempts.append(retry)
        raise RankFaultError("x", op="dispatch", seq=1, peer_closed=True)

    started = time.monotonic()
    with pytest.raises(GroupFailedError) as err:
        m.member.run_step(attempt)
    m.assert_fenced_and_failed(store, err.value, time.monotonic() - started)
    assert attempts == [False], "never redone on a group that cannot rebuild"


def test_a_rebuilt_communicators_rendezvous_ends_within_the_rebuild_budget():
    """Issue 12: a member that died between the agreement and the rendezvous of the new
    communicator must not hold the survivors in ProcessGroupGloo's constructor for the first
    epoch's long timeout (>= 120 s, past the rebuild budget): epoch > 0 uses the budget."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))
    transport = GlooTransport(store, "dp", timedelta(seconds=120),
                              rebuilt_timeout=timedelta(seconds=1.5))
    started = time.monotonic()
    with pytest.raises(Exception):  # rank 1 of epoch 1 never arrives
        transport.configure(1, 0, 2)
    waited = time.monotonic() - started
    assert waited < 60, f"the rendezvous waited {waited:.1f}s: the first epoch's timeout"


class _NoPeerTransport:
    """A transport that rebuilds in place and talks to no peer (the core's view of one)."""

    name = "no_peer"
    recovery_tier = RecoveryTier.REBUILD_IN_PLACE

    def configure(self, epoch: int, rank: int, world_size: int) -> None:
        pass

    def abort(self) -> None:
        pass


class _ExpertsThatCannotLoad(StubExperts):
    def adopt(self, old, new) -> list[int]:
        from vllm_elastic_ft.vllm.expert_loader import ExpertLoadError

        raise ExpertLoadError("layer 0 expert 2: no weights in 'org/model' (a hub id, not a "
                              "local directory)")


def test_an_expert_load_that_cannot_be_done_ends_in_failed_with_the_reason(store):
    """Issue 12: ExpertLoadError is not a rank fault; it used to crash the engine. Now the
    group goes to FAILED (published for the orchestrator) with the reason."""
    from vllm_elastic_ft.group.member import GroupMember, MemberOptions

    member = GroupMember(0, 2, store, StubWatchdog(), _NoPeerTransport(),
                         MemberOptions(report_wait_s=0.2, join_window_s=0.2), group="dp")
    member.attach_experts(_ExpertsThatCannotLoad(), num_experts=4)
    with pytest.raises(GroupFailedError) as err:
        member.recover("rank 1 died")
    assert "cannot take experts" in str(err.value) and "ExpertLoadError" in str(err.value)
    assert member.controller.view.state is GroupState.FAILED
    epoch = current_epoch(store, "dp")
    assert "no weights" in store.get(keys.failed("dp", epoch)).decode()


def test_retired_communicators_are_released_once_no_collective_can_wait_on_them(store):
    """Issue 12, bounded resources: every rebuild aborts a communicator; each aborted one was
    kept forever (a destroy could block on a collective waiting for a stopped peer). Once its
    timeout has passed nothing can wait on it: it is released, and threads stay flat."""
    import threading

    from vllm_elastic_ft.comm.elastic_group import ElasticProcessGroup

    group = ElasticProcessGroup(store, timedelta(seconds=0.3))
    group.configure("warm/", 0, 1)
    group.abort()
    time.sleep(0.4)
    group.abort()
    threads_before = threading.active_count()
    for epoch in range(12):
        group.configure(f"e{epoch}/", 0, 1)
        group.abort()
        time.sleep(0.4)
    assert len(group._retired) <= 1, len(group._retired)
    assert threading.active_count() <= threads_before + 2
    # A communicator aborted just now is kept: a collective may still wait on it.
    group.configure("last/", 0, 1)
    group.abort()
    assert any(at > time.monotonic() - 0.3 for _, at, _ in group._retired)
