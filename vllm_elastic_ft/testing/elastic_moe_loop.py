"""The MoE loop that survives a rank failure: fence, agree, rebuild, re-place experts, go on.

Each rank process runs dispatch -> experts -> combine on an epoch-scoped gloo
group under its rank watchdog. On a fault (the watchdog's RankFaultError), a
fence seen in the store, or a join request, the survivors:

1. fence the group (epoch + 1, one atomic compare-and-set in the store);
2. agree on the members of the new epoch (``group/membership.py``);
3. abort the old communicator and build a new one under ``eft/<g>/e<epoch>/pg``;
4. hold the experts the placement solver gives them, loading only the orphaned
   ones from the checkpoint;
5. move the watchdog to the new epoch, and redo the step that failed.

A rank that wakes up in an old epoch is refused (FencedError); with
``rejoin_when_fenced`` it asks to join the next epoch instead. Every step's
output is checked against a dense single-process computation of the same
tokens, so "outputs after recovery are correct" is measured, not assumed.

Ranks agree on stopping and on admitting a joiner through a control word
all-gathered with each dispatch, so every rank acts at the same step and
admits the same joiner (the word carries its id: each rank reading the
request from the store on its own could see it before or after the leader
of the admitting epoch deleted it).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch

from vllm_elastic_ft.comm.elastic_group import ElasticProcessGroup
from vllm_elastic_ft.faults import connect_store
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group import membership as ms
from vllm_elastic_ft.group.controller import GroupController
from vllm_elastic_ft.group.fencing import FencedError, current_epoch, fence
from vllm_elastic_ft.group.state_machine import (
    ControllerOptions, GroupState, JoinRequested, PeerFenced, RebuildDone, RebuildFailed,
    RebuildStarted, Served,
)
from vllm_elastic_ft.placement.solver import PlacementPlan, contiguous
from vllm_elastic_ft.testing.moe_loop import MoELayer, MoELoopSpec
from vllm_elastic_ft.watchdog.guarded import guarded_combine, guarded_dispatch
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings
from vllm_elastic_ft.watchdog.report import LogAndCountSink, RankFaultError

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


class _Rebuild(Exception):
    """The control word says: admit a joiner now."""

    def __init__(self, joiner: int):
        super().__init__(f"rank {joiner} asks to join")
        self.joiner = joiner


class ElasticRank:
    def __init__(self, rank_id: int, world: int, store_address: str, spec: ElasticLoopSpec,
                 settings: WatchdogSettings):
        self.id = rank_id
        self.spec = spec
        self.group = spec.moe.group
        self.store = connect_store(store_address)
        self.sink = LogAndCountSink()
        self.pg = ElasticProcessGroup(self.store, timedelta(seconds=spec.pg_timeout_s))
        self.controller = GroupController(self.group, world, spec.options, rank=rank_id)
        self.layer = MoELayer(spec.moe, rank_id, world)
        g = torch.Generator().manual_seed(rank_id)
        self.x = torch.randn(spec.moe.tokens + rank_id, spec.moe.hidden, generator=g)
        self.reference = self.layer.dense_reference(self.x)
        self.members = ms.Membership(0, tuple(range(world)), contiguous(spec.moe.experts, list(range(world))), 0)
        self.watchdog = RankWatchdog(settings, self.store, self.group, rank_id, world, sink=self.sink)
        self.timeline: list[tuple[float, str]] = []
        self.steps_ok = 0
        self.steps_ok_at_epoch: dict[int, int] = {}
        self.mismatches = 0
        self.loaded: list[int] = []

    # ------------------------------------------------------------------ steps
    def _control(self) -> int:
        word = _STOP_BIT if self.store.check([STOP_KEY]) else 0
        joiner = ms.pending_join(self.store, self.group)
        if joiner is not None:
            word |= _JOIN_BIT | (joiner + 1) << _JOINER_SHIFT
        return word

    def step(self) -> tuple[int, int | None]:
        """One MoE step on the current group.

        Returns the OR of every rank's control flags and the joiner that some
        rank saw asking (the same on every rank: all read the same gathered words).
        """
        sizes = [self.spec.moe.tokens + r for r in self.members.members]
        weights, ids = self.layer.route(self.x)
        control = torch.tensor([[self._control()]], dtype=torch.int64).expand(self.x.shape[0], 1)
        pg = self.pg.pg
        all_x, all_w, all_ids, all_ctl = guarded_dispatch(
            self.watchdog, [self.x, weights, ids, control.contiguous()], sizes, pg)
        partial = self.layer.experts(all_x, all_w, all_ids)
        out = guarded_combine(self.watchdog, partial, sizes, pg)
        if torch.allclose(out, self.reference, atol=1e-5, rtol=1e-4):
            self.steps_ok += 1
            epoch = self.members.epoch
            self.steps_ok_at_epoch[epoch] = self.steps_ok_at_epoch.get(epoch, 0) + 1
        else:
            self.mismatches += 1
        words = all_ctl.flatten().unique().tolist()
        flags = 0
        for value in words:
            flags |= int(value) & ((1 << _JOINER_SHIFT) - 1)
        joiner = max(int(value) >> _JOINER_SHIFT for value in words) - 1
        return flags, (joiner if joiner >= 0 else None)

    # ---------------------------------------------------------------- rebuild
    def rebuild(self, cause: str, wait_for_report_s: float, joiner: int | None = None) -> None:
        """Fence, agree and adopt the next epoch; ``joiner``: the rank the control word admits."""
        self.timeline.append((time.time(), f"rebuild: {cause}"))
        old = self.members
        suspects = epochs.reported_suspects(
            lambda: self.sink.reports, old,
            lambda: current_epoch(self.store, self.group) > old.epoch, wait_for_report_s)
        report = next((asdict(r) | {"kind": r.kind.value} for r in self.sink.reports
                       if r.epoch == old.epoch), None)
        if report is not None:
            self.controller.fault(report | {"suspects": sorted(suspects)})
        if joiner is None:  # a fault: admit a rank that is waiting to join in the same rebuild
            joiner = ms.pending_join(self.store, self.group)
        if joiner is not None and self.controller.view.state is GroupState.HEALTHY:
            self.controller.handle(JoinRequested(joiner))
        epoch = fence(self.store, self.group, old.epoch)
        self.timeline.append((time.time(), f"fenced: epoch {old.epoch} -> {epoch}"))
        self.controller.handle(PeerFenced(epoch, tuple(sorted(suspects))))  # if a peer was first
        self.controller.handle(RebuildStarted(epoch))
        try:  # the same fence (idempotent) and agreement as a vLLM worker's
            new = epochs.advance(self.store, self.group, old, self.id, suspects,
                                 self.spec.moe.experts, self.spec.join_window_s,
                                 self.spec.options.rebuild_budget_s, joiner=joiner)
        except TimeoutError as err:
            self.controller.handle(RebuildFailed(epoch, str(err)))
            raise
        self._adopt(new, joiner)
        self.controller.handle(RebuildDone(epoch, new.members))

    def _adopt(self, new: ms.Membership, joiner: int | None) -> None:
        if joiner is not None and new.leader == self.id and joiner in new.members:
            self.store.delete_key(ms.join_request_key(self.group))
        me = new.group_rank(self.id)
        # Watchdog first: if a member dies before the communicator is up, its
        # heartbeat at the new epoch is what names it.
        self.watchdog.reconfigure(new.epoch, me, len(new.members))
        self.members = new
        plan = PlacementPlan(new.placement)
        held = new.placement[self.id]
        self.loaded += self.layer.hold(held, [e for e in held if plan.owner_of(e) == self.id])
        try:
            self.pg.configure(f"eft/{self.group}/e{new.epoch}/pg", me, len(new.members))
        except RuntimeError as err:  # a member vanished between agreement and connect
            raise RankFaultError(f"epoch {new.epoch} communicator: {err}", op="configure",
                                 seq=-1, peer_closed=True) from err
        self.timeline.append((time.time(), f"rebuilt: epoch {new.epoch}, members {list(new.members)}, "
                                           f"holds {list(held)}"))

    def join(self) -> None:
        """A replacement: ask to join, wait for the fence that admits it, agree.

        A leader that did not expect this rank (it published before the request
        reached it) leaves it out: then it asks again, for the next epoch.
        """
        deadline = time.monotonic() + self.spec.options.rebuild_budget_s
        while True:
            seen = current_epoch(self.store, self.group)
            ms.request_join(self.store, self.group, self.id)
            self.timeline.append((time.time(), "join requested"))
            while current_epoch(self.store, self.group) <= seen:
                if time.monotonic() > deadline:
                    raise TimeoutError("no epoch admitted this joiner")
                time.sleep(0.01)
            epoch = current_epoch(self.store, self.group)
            try:
                new = ms.agree(self.store, self.group, epoch, self.id, [], 0.0, lambda m: {},
                               timeout_s=self.spec.options.rebuild_budget_s)
                break
            except FencedError:
                if time.monotonic() > deadline:
                    raise TimeoutError("no epoch admitted this joiner") from None
                self.timeline.append((time.time(), f"not admitted at epoch {epoch}, asking again"))
        self.controller.handle(PeerFenced(epoch))
        self.controller.handle(RebuildStarted(epoch))
        self._adopt(new, None)
        self.controller.handle(RebuildDone(epoch, new.members))

    # ------------------------------------------------------------------- loop
    def run(self) -> str:
        if self.spec.joiner:
            self.join()
        else:
            self.pg.configure(f"eft/{self.group}/e0/pg", self.id, len(self.members.members))
        for _ in range(self.spec.max_steps):
            try:
                word, joiner = self.step()
                self.store.set(f"loop/step/{self.id}", f"{self.members.epoch}:{self.steps_ok}")
                if self.controller.view.state is GroupState.READY:
                    self.controller.handle(Served(self.members.epoch))
                    self.timeline.append((time.time(), f"serving at epoch {self.members.epoch}"))
                if word & _STOP_BIT:
                    return "stopped"
                if word & _JOIN_BIT and joiner is not None:
                    raise _Rebuild(joiner)
            except (RankFaultError, FencedError, _Rebuild) as err:
                if self.controller.view.state is GroupState.FAILED:
                    return "failed"
                try:
                    if isinstance(err, FencedError) and self._stale():
                        raise err  # slept through a whole rebuild: not a member any more
                    wait = 0.0 if isinstance(err, (_Rebuild, FencedError)) else 1.5
                    self.rebuild(f"{type(err).__name__}: {err}"[:200], wait,
                                 err.joiner if isinstance(err, _Rebuild) else None)
                except FencedError as refused:
                    if not self.spec.rejoin_when_fenced:
                        self.timeline.append((time.time(), f"refused: {refused}"))
                        return "fenced_out"
                    self.timeline.append((time.time(), f"stale, rejoining: {refused}"))
                    self.join()
                except TimeoutError:
                    return "failed"
            if self.controller.view.state is GroupState.FAILED:
                return "failed"
        return "max_steps"

    def _stale(self) -> bool:
        """Whether this rank slept through a whole rebuild (its epoch's successor is settled)."""
        epoch = current_epoch(self.store, self.group)
        return epoch > self.members.epoch and self.store.check(
            [f"eft/{self.group}/e{epoch}/members"])

    def result(self, exit_reason: str) -> dict:
        return {
            "rank": self.id, "exit": exit_reason, "epoch": self.members.epoch,
            "members": list(self.members.members), "holds": list(self.layer.experts_held),
            "loaded_from_checkpoint": self.loaded, "steps_ok": self.steps_ok,
            "steps_ok_at_epoch": self.steps_ok_at_epoch, "mismatches": self.mismatches,
            "timeline": self.timeline, "events": self.controller.events,
            "reports": [asdict(r) | {"kind": r.kind.value} for r in self.sink.reports],
            "state": self.controller.view.state.value,
        }


def run_elastic_loop(rank_id: int, world: int, store_address: str, spec: ElasticLoopSpec,
                     settings: WatchdogSettings) -> dict:
    rank = ElasticRank(rank_id, world, store_address, spec, settings)
    try:
        reason = rank.run()
    finally:
        rank.watchdog.shutdown()
        rank.pg.shutdown()
    return rank.result(reason)
