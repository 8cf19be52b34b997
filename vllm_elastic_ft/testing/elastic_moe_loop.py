"""The MoE loop that survives a rank failure, run on the product's own recovery core.

Each rank process runs dispatch -> experts -> combine on the group's gloo
transport under its rank watchdog, inside :meth:`GroupMember.run_step` — the
very object a vLLM worker runs (``group/member.py``; ``vllm/worker_group.py``
is its vLLM glue). On a fault the core fences, agrees, rebuilds the
communicator, adopts the new placement (this harness's ``ExpertHolder`` loads
the orphaned experts from its seeded "checkpoint") and the step is redone.

What stays here is only what a door does: deciding *when* to admit a joiner
(vLLM's front end does it by RPC; here every rank learns it from a control
word all-gathered with each dispatch, so all ranks admit the same joiner at
the same step) and checking every step's output against a dense
single-process computation of the same tokens, so "outputs after recovery are
correct" is measured, not assumed. A rank that wakes up in an old epoch is
refused (FencedError); with ``rejoin_when_fenced`` it asks to join instead.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.comm.transport import GlooTransport
from vllm_elastic_ft.faults.injection import FaultInjection
from vllm_elastic_ft.group import membership as ms
from vllm_elastic_ft.group.fencing import FencedError
from vllm_elastic_ft.group.member import GroupFailedError, GroupMember, MemberOptions
from vllm_elastic_ft.group.state_machine import ControllerOptions, GroupState
from vllm_elastic_ft.testing.moe_loop import MoELayer, MoELoopSpec
from vllm_elastic_ft.watchdog.guarded import guarded_combine, guarded_dispatch
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings
from vllm_elastic_ft.watchdog.report import LogAndCountSink

STOP_KEY = "loop/stop"
_JOIN_BIT, _STOP_BIT = 1, 2
_JOINER_SHIFT = 8  # control word = flags | (joiner id + 1) << _JOINER_SHIFT


def loop_progress(store, rank_id: int) -> tuple[int, int]:
    """``(epoch, correct steps)`` that rank ``rank_id`` last published (0, 0 before any)."""
    key = f"loop/step/{rank_id}"
    if not store.check([key]):
        return 0, 0
    epoch, steps = store.get(key).decode().split(":")
    return int(epoch), int(steps)


def wait_for_progress(store, ranks, epoch: int, steps: int, timeout_s: float = 60) -> None:
    """Block until every rank in ``ranks`` reached ``epoch`` with at least ``steps`` correct steps."""
    deadline = time.monotonic() + timeout_s
    while True:
        progress = {r: loop_progress(store, r) for r in ranks}
        if all(e >= epoch and s >= steps for e, s in progress.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(progress)
        time.sleep(0.02)


@dataclass(frozen=True)
class ElasticLoopSpec:
    moe: MoELoopSpec = field(default_factory=lambda: MoELoopSpec(group="elastic"))
    # How long an epoch's leader waits for an expected survivor: longer than a
    # deadline, since a survivor may sit that long in a collective of the old epoch.
    join_window_s: float = 3.0
    options: ControllerOptions = field(default_factory=lambda: ControllerOptions(
        rebuild_budget_s=20.0, max_rebuilds=3, min_live_ranks=1))
    pg_timeout_s: float = 10.0
    joiner: bool = False  # this process replaces a lost rank: it starts by asking to join
    rejoin_when_fenced: bool = False
    max_steps: int = 100_000


class LayerExperts:
    """The harness layer's experts as the recovery core's ``ExpertHolder``."""

    def __init__(self, layer: MoELayer):
        self.layer = layer

    def held(self) -> tuple[int, ...]:
        return tuple(self.layer.experts_held)

    def adopt(self, old: tuple[int, ...], new: tuple[int, ...]) -> list[int]:
        return self.layer.hold(new)


class ElasticRank:
    def __init__(self, rank_id: int, world: int, store_address: str, spec: ElasticLoopSpec,
                 settings: WatchdogSettings):
        self.id = rank_id
        self.spec = spec
        self.group = spec.moe.group
        self.store = connect_store(store_address)
        self.sink = LogAndCountSink()
        self.layer = MoELayer(spec.moe, rank_id, world)
        g = torch.Generator().manual_seed(rank_id)
        self.x = torch.randn(spec.moe.tokens + rank_id, spec.moe.hidden, generator=g)
        self.reference = self.layer.dense_reference(self.x)
        # The harness is a drill: fault injection is on here (as `fault_injection: true`).
        injection = FaultInjection(self.store, self.group, rank_id)
        self.watchdog = RankWatchdog(settings, self.store, self.group, rank_id, world,
                                     sink=self.sink, injection=injection)
        self.transport = GlooTransport(self.store, self.group,
                                       timedelta(seconds=spec.pg_timeout_s))
        options = MemberOptions(True, spec.join_window_s, 1.5, spec.options)
        self.member = GroupMember(rank_id, world, self.store, self.watchdog, self.transport,
                                  options, self.group, injection, joining=spec.joiner)
        self.member.attach_experts(LayerExperts(self.layer), spec.moe.experts)
        self.timeline: list[tuple[float, str]] = []
        self.steps_ok = 0
        self.steps_ok_at_epoch: dict[int, int] = {}
        self.mismatches = 0

    @property
    def controller(self):
        return self.member.controller

    # ------------------------------------------------------------------ steps
    def _control(self) -> int:
        word = _STOP_BIT if self.store.check([STOP_KEY]) else 0
        joiner = ms.pending_join(self.store, self.group)
        if joiner is not None:
            word |= _JOIN_BIT | (joiner + 1) << _JOINER_SHIFT
        return word

    def step(self, retry: bool = False) -> tuple[int, int | None]:
        """One MoE step on the current group.

        Returns the OR of every rank's control flags and the joiner that some
        rank saw asking (the same on every rank: all read the same gathered words).
        """
        sizes = [self.spec.moe.tokens + r for r in self.member.live]
        weights, ids = self.layer.route(self.x)
        control = torch.tensor([[self._control()]], dtype=torch.int64).expand(self.x.shape[0], 1)
        all_x, all_w, all_ids, all_ctl = guarded_dispatch(
            self.watchdog, self.transport, [self.x, weights, ids, control.contiguous()], sizes)
        partial = self.layer.experts(all_x, all_w, all_ids)
        out = guarded_combine(self.watchdog, self.transport, partial, sizes)
        if torch.allclose(out, self.reference, atol=1e-5, rtol=1e-4):
            self.steps_ok += 1
            epoch = self.member.epoch
            self.steps_ok_at_epoch[epoch] = self.steps_ok_at_epoch.get(epoch, 0) + 1
        else:
            self.mismatches += 1
        words = all_ctl.flatten().unique().tolist()
        flags = 0
        for value in words:
            flags |= int(value) & ((1 << _JOINER_SHIFT) - 1)
        joiner = max(int(value) >> _JOINER_SHIFT for value in words) - 1
        return flags, (joiner if joiner >= 0 else None)

    # ------------------------------------------------------------ admission
    def admit(self, joiner: int) -> None:
        """Every member, at the same step: admit ``joiner`` with the ticket it asked with."""
        if self.id == min(self.member.live):
            # Before the admission's rendezvous, which every member waits in: no
            # member can read the request again at its next step.
            self.store.delete_key(keys.join_request(self.group))
        ticket = self.store.get(keys.join_ticket(self.group, joiner)).decode()
        new = self.member.admit(joiner, ticket)
        self.timeline.append((time.time(), f"admitted rank {joiner} at epoch {new.epoch}"))

    def join(self) -> None:
        """A replacement (or stale) rank: ask to join, then be admitted by the core.

        A leader that did not expect this rank in time leaves it out: then it
        asks again, with a new ticket, until the rebuild budget is spent.
        """
        deadline = time.monotonic() + self.spec.options.rebuild_budget_s
        while True:
            ticket = f"r{self.id}-{uuid.uuid4().hex[:8]}"
            self.store.set(keys.join_ticket(self.group, self.id), ticket)
            ms.request_join(self.store, self.group, self.id)
            self.timeline.append((time.time(), "join requested"))
            try:
                new = self.member.admit(self.id, ticket)
                break
            except FencedError:
                if time.monotonic() > deadline:
                    raise TimeoutError("no epoch admitted this joiner") from None
                self.timeline.append((time.time(), "not admitted, asking again"))
        self.timeline.append((time.time(), f"rebuilt: epoch {new.epoch}, members "
                                           f"{list(new.members)}, holds {self.layer.experts_held}"))

    # ------------------------------------------------------------------- loop
    def run(self) -> str:
        try:
            if self.spec.joiner:
                self.join()
            for _ in range(self.spec.max_steps):
                try:
                    word, joiner = self.member.run_step(self.step)
                    ready = self.controller.view.state is GroupState.READY
                    self.member.served()
                    self.store.set(f"loop/step/{self.id}", f"{self.member.epoch}:{self.steps_ok}")
                    if ready:
                        self.timeline.append((time.time(), f"serving at epoch {self.member.epoch}"))
                    if word & _STOP_BIT:
                        return "stopped"
                    if word & _JOIN_BIT and joiner is not None:
                        self.admit(joiner)
                except FencedError as refused:
                    if not self.spec.rejoin_when_fenced:
                        self.timeline.append((time.time(), f"refused: {refused}"))
                        return "fenced_out"
                    self.timeline.append((time.time(), f"stale, rejoining: {refused}"))
                    self.member.leave_for_rejoin()
                    self.join()
            return "max_steps"
        except (GroupFailedError, TimeoutError) as err:
            self.timeline.append((time.time(), f"failed: {err}"))
            return "failed"

    def result(self, exit_reason: str) -> dict:
        return {
            "rank": self.id, "exit": exit_reason, "epoch": self.member.epoch,
            "members": list(self.member.live), "holds": list(self.layer.experts_held),
            "loaded_from_checkpoint": self.member.loaded_experts, "steps_ok": self.steps_ok,
            "steps_ok_at_epoch": self.steps_ok_at_epoch, "mismatches": self.mismatches,
            "timeline": self.timeline, "events": self.controller.events,
            "reports": [asdict(r) | {"kind": r.kind.value} for r in self.sink.reports],
            "state": self.controller.view.state.value,
            "core": type(self.member).__qualname__,
        }


def run_elastic_loop(rank_id: int, world: int, store_address: str, spec: ElasticLoopSpec,
                     settings: WatchdogSettings) -> dict:
    rank = ElasticRank(rank_id, world, store_address, spec, settings)
    try:
        reason = rank.run()
    finally:
        rank.watchdog.shutdown()
        rank.member.shutdown()
    return rank.result(reason)
