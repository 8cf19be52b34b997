"""GroupMember: the one recovery core — how one rank moves its group through a fault.

Every process that takes part in a group's collectives runs this object,
whatever the door: a vLLM worker (``vllm/worker_group.py`` is only glue
around it), the multi-process harness (``testing/elastic_moe_loop.py``) and,
through them, the Ray Serve replicas' engines. It owns, for one rank:

* **recover** — suspects (this rank's FaultReports) → fault → fence (epoch
  + 1 in the store, the fencing token) → agree on members and expert placement
  (``group/epochs.py``) → reconfigure the watchdog → adopt the placement
  (load only the orphaned experts) → the transport's communicator of the new
  epoch → READY; the caller then redoes its interrupted step
  (:meth:`run_step`);
* **follow** — catch up with an epoch a peer already moved to;
* **idle rebuild** — a rank with no step in flight rebuilds from its
  watchdog's thread, so an idle group is ready before the next request;
* **admit** — bring a replacement rank in at a planned epoch (every member
  and the joiner call it at once; the door orchestrates when);
* **served** — the first step of a new epoch went through: HEALTHY again.

The state machine (``group/state_machine.py``) is the only judge of retries
and budgets: every pass through :meth:`recover` is one more fenced epoch, the
state machine counts them (``max_rebuilds``) and times them
(``rebuild_budget_s``), and when it says FAILED the core raises
:class:`GroupFailedError` — no caller loops on its own count. What the
transport can do on a fault is data (``comm/transport.py``,
``RecoveryTier``): a transport without an in-place rebuild fences the group
and goes straight to FAILED, naming the transport (the orchestrator's gang
restart), within the report wait.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, TypeVar

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.transport import RecoveryTier, Transport, tier_for
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group import membership as ms
from vllm_elastic_ft.group.controller import GroupController
from vllm_elastic_ft.group.fencing import FencedError, fence
from vllm_elastic_ft.group.state_machine import (
    ControllerOptions, GroupState, JoinRequested, PeerFenced, RebuildDone, RebuildFailed,
    RebuildStarted, Served, Tick,
)
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.watchdog.report import RankFaultError

logger = get_logger(__name__)

T = TypeVar("T")

#: What a step may raise that the core recovers from (anything else is not a rank fault).
RECOVERABLE = (RankFaultError, FencedError)


class GroupFailedError(RuntimeError):
    """The group cannot be rebuilt (budget, attempts, a step mismatch, its transport): FAILED."""


class ExpertHolder(Protocol):
    """The experts one rank computes, as the core needs them (vLLM model or harness layer)."""

    def held(self) -> tuple[int, ...]:
        """The experts this rank computes now."""

    def adopt(self, old: tuple[int, ...], new: tuple[int, ...]) -> list[int]:
        """Compute exactly ``new`` from now on (it computed ``old``): load from the checkpoint
        what it lacks, stop computing what it no longer owns. Returns the experts loaded."""


@dataclass(frozen=True)
class MemberOptions:
    """The core's share of ``ElasticFTConfig`` (same names, same units)."""

    in_engine_rebuild: bool = True
    join_window_s: float = 3.0
    #: How long a rank whose collective failed waits for its watchdog to name the
    #: culprit before it fences anyway (the epoch's leader decides who is in).
    report_wait_s: float = 1.0
    controller: ControllerOptions = field(default_factory=ControllerOptions)

    @classmethod
    def from_config(cls, config, report_wait_s: float = 1.0) -> MemberOptions:
        return cls(config.in_engine_rebuild, config.join_window_s, report_wait_s,
                   config.controller_options())


class GroupMember:
    """One rank (stable id ``rank_id``, its DP rank) of a group of logical width ``world``.

    Args:
        rank_id: the rank's stable id (never changes across epochs).
        world: the group's logical width N (lost ranks leave holes).
        store: the group's store.
        watchdog: this rank's ``RankWatchdog`` (its reports name the suspects).
        transport: the group's communicator (``comm/transport.py``).
        options: timing and the state machine's limits.
        group: the group's name in the store.
        injection: the fault-injection hook, or None (no injection key read).
        joining: a replacement rank: alone until :meth:`admit` brings it in.
    """

    def __init__(self, rank_id: int, world: int, store, watchdog, transport: Transport,
                 options: MemberOptions, group: str = "dp", injection=None,
                 joining: bool = False):
        self.id = rank_id
        self.world = world
        self.store = store
        self.watchdog = watchdog
        self.transport = transport
        self.options = options
        self.group = group
        self.injection = injection
        self.controller = GroupController(group, world, options.controller, rank=rank_id)
        self.experts: ExpertHolder | None = None
        self.num_experts = 0
        self.loaded_experts: list[int] = []
        self.members = ms.Membership(-1, (rank_id,), {}, -1) if joining else \
            ms.Membership(0, tuple(range(world)), {}, -1)
        #: Steps begun (a redone step keeps its number; admission hands it to a joiner).
        self.step = 0
        # A step runs from its first collective to its end. Between steps (an idle
        # engine) the watchdog's thread may run the rebuild itself: nobody else
        # would, since an idle rank never meets the failed collective.
        self._lock = threading.RLock()
        self._step_depth = 0
        self._idle_rebuild: threading.Thread | None = None
        self._fenced_out: BaseException | None = None
        if not joining:
            transport.configure(0, rank_id, world)
        watchdog.after_tick = self._maybe_rebuild_while_idle

    # ----------------------------------------------------------- state
    @property
    def joining(self) -> bool:
        """A replacement rank not admitted yet (its membership has no epoch)."""
        return self.members.epoch < 0

    @property
    def live(self) -> tuple[int, ...]:
        return self.members.members

    @property
    def epoch(self) -> int:
        return self.members.epoch

    def group_rank(self) -> int:
        return self.members.group_rank(self.id)

    def attach_experts(self, experts: ExpertHolder, num_experts: int) -> None:
        """Know the experts this rank computes (the placement starts from them)."""
        if self.experts is not None:
            return
        self.experts, self.num_experts = experts, num_experts
        held = tuple(experts.held())
        if self.joining:
            self.members = ms.Membership(-1, (self.id,), {self.id: held}, -1)
            return
        if num_experts and not self.members.placement:
            self.members = epochs.initial(self.world, num_experts)
            if held != self.members.placement[self.id]:
                logger.warning("rank %d holds experts %s, not the contiguous layout %s the "
                               "placement solver assumes", self.id, list(held),
                               list(self.members.placement[self.id]))

    # ----------------------------------------------------------- steps
    def run_step(self, attempt: Callable[[bool], T]) -> T:
        """Run ``attempt(retry)``; after a rank fault, recover and run it again with
        ``retry=True``, until it goes through or the state machine says FAILED."""
        with self._lock:  # waits for a rebuild the watchdog's thread started while idle
            self._step_depth += 1
        try:
            retry = False
            while True:
                self.follow()
                try:
                    return attempt(retry)
                except RECOVERABLE as err:
                    self.recover(f"{type(err).__name__}: {err}")
                    retry = True
        finally:
            with self._lock:
                self._step_depth -= 1

    def follow(self) -> None:
        """Catch up with an epoch a peer (or the engine) already moved to."""
        if self._fenced_out is not None:
            raise self._fenced_out
        if not self.joining and self.watchdog.group_epoch > self.members.epoch:
            self.recover(f"the group moved to epoch {self.watchdog.group_epoch}")

    def served(self) -> None:
        """A step went through at this epoch: a READY group is HEALTHY again."""
        if self.controller.view.state is GroupState.READY:
            self.controller.handle(Served(self.members.epoch))
            # The front end's follower turns READY into HEALTHY on this mark: the
            # first step of the new epoch went through on a member.
            self.store.set(keys.serving(self.group, self.members.epoch), str(self.id))

    def fail(self, reason: str):
        """Give up on the group: FAILED, published for the front end, and raised."""
        epoch = max(self.members.epoch, self.controller.view.epoch)
        self.controller.handle(RebuildFailed(self.controller.view.epoch, reason))
        try:  # the first reason stays (a later follow() of a FAILED group fails again)
            self.store.compare_set(keys.failed(self.group, epoch), "", reason)
        except Exception:  # the store is gone: the raise below still ends the rank
            logger.exception("rank %d: could not publish FAILED", self.id)
        logger.error("rank %d epoch %d: group cannot be rebuilt: %s", self.id, epoch, reason)
        raise GroupFailedError(reason)

    # --------------------------------------------------------- recover
    def recover(self, cause: str) -> ms.Membership:
        """Move to the next epoch's group (see the module doc).

        Raises:
            FencedError: this rank is no longer a member (it must leave or rejoin).
            GroupFailedError: the state machine gave up, or the transport cannot rebuild.
        """
        while True:
            view = self.controller.handle(Tick())
            if view.state is GroupState.FAILED:
                self.fail(view.reason)
            try:
                return self._rebuild_once(cause)
            except RankFaultError as again:  # a member vanished before the communicator was up
                cause = f"{type(again).__name__}: {again}"

    def _rebuild_once(self, cause: str) -> ms.Membership:
        if not self.options.in_engine_rebuild:
            self.fail(f"in-engine rebuild is off: {cause}")
        started = time.monotonic()
        old = self.members
        if not old.placement:
            self.fail(f"{cause}: the placement is unknown (no experts attached)")
        suspects = self._suspects(old)
        logger.warning("rank %d: recovering from epoch %d (%s); suspects %s", self.id, old.epoch,
                       cause[:300], sorted(suspects))
        if tier_for(self.transport) is not RecoveryTier.REBUILD_IN_PLACE:
            self._fence_for_gang_restart(old, suspects)
        if self.injection is not None:
            self.injection.hold_rebuild()
        try:
            new = epochs.advance(self.store, self.group, old, self.id, suspects, self.num_experts,
                                 self.options.join_window_s,
                                 self.options.controller.rebuild_budget_s,
                                 silent=lambda: self._silent_members(old))
        except TimeoutError as err:
            self.fail(str(err))
        self.controller.handle(PeerFenced(new.epoch, tuple(sorted(suspects))))
        self.controller.handle(RebuildStarted(new.epoch))
        if self.controller.view.state is GroupState.FAILED:
            self.fail(self.controller.view.reason)
        self._adopt(old, new)
        logger.warning("rank %d: rebuilt at epoch %d with members %s in %.3fs (holds experts %s)",
                       self.id, new.epoch, list(new.members), time.monotonic() - started,
                       list(new.placement[self.id]))
        return new

    def _suspects(self, old: ms.Membership) -> set[int]:
        """This rank's suspects at ``old.epoch`` (fed to the state machine as a Fault)."""
        reports = lambda: self.watchdog.sink.reports  # noqa: E731
        suspects = epochs.reported_suspects(reports, old,
                                            lambda: self.watchdog.group_epoch > old.epoch,
                                            self.options.report_wait_s)
        report = next((r for r in reports() if r.epoch == old.epoch), None)
        if report is not None:
            self.controller.fault({"epoch": report.epoch, "suspects": sorted(suspects),
                                   "kind": report.kind.value, "reporter": self.id})
        return suspects

    def _silent_members(self, old: ms.Membership) -> set[int]:
        """The members of ``old`` this rank's watchdog finds dead or silent now (none once
        the watchdog has moved past ``old``: its ranks are numbered for another epoch)."""
        if self.watchdog.epoch != old.epoch:
            return set()
        return {old.members[r] for r in self.watchdog.silent_peers() if r < len(old.members)}

    def _fence_for_gang_restart(self, old: ms.Membership, suspects: set[int]) -> None:
        """The transport's tier: fence (no request is admitted any more), then FAILED."""
        epoch = fence(self.store, self.group, old.epoch)
        self.controller.handle(PeerFenced(epoch, tuple(sorted(suspects))))
        self.transport.abort()
        self.fail(f"transport {self.transport.name} has no in-engine rebuild "
                  f"(recovery tier {tier_for(self.transport).value}): the orchestrator "
                  "restarts the gang")

    def _adopt(self, old: ms.Membership, new: ms.Membership) -> None:
        """Watchdog, experts, communicator of ``new`` (READY once the communicator is up)."""
        me = new.group_rank(self.id)
        # Watchdog first: if a member dies before the communicator is up, its
        # heartbeat at the new epoch is what names it.
        self.watchdog.reconfigure(new.epoch, me, len(new.members))
        if self.experts is not None:
            try:
                self.loaded_experts += self.experts.adopt(tuple(old.placement.get(self.id, ())),
                                                          tuple(new.placement[self.id]))
            except RankFaultError:
                raise
            except Exception as err:  # noqa: BLE001 - e.g. ExpertLoadError: no retry can help
                # This rank cannot hold the experts the new epoch gives it (weights missing,
                # a layer the loader does not support): the group cannot serve them, so it
                # ends in FAILED with the reason — the orchestrator's restart — rather than
                # an engine crash.
                self.fail(f"epoch {new.epoch}: rank {self.id} cannot take experts "
                          f"{list(new.placement[self.id])}: {type(err).__name__}: {err}")
        self.members = new
        try:
            self.transport.configure(new.epoch, me, len(new.members))
        except RuntimeError as err:  # a member vanished between agreement and connect
            raise RankFaultError(f"epoch {new.epoch} communicator: {err}", op="configure",
                                 seq=-1, peer_closed=True) from err
        self.controller.handle(RebuildDone(new.epoch, new.members))

    # ----------------------------------------------------------- admit
    def admit(self, joiner: int, ticket: str) -> ms.Membership:
        """Bring ``joiner`` (a replacement rank) into the group at the next epoch.

        Called on every member and on the joiner at once, between steps. The
        joiner keeps the experts it loaded; members stop computing those; the
        joiner takes the members' step number so step checks stay exact.
        """
        with self._lock:
            started = time.monotonic()
            old = None if self.joining else self.members
            held = self.members.placement.get(self.id, ())
            new = epochs.admit(self.store, self.group, old, self.id, joiner, ticket,
                               held if old is None else None, self.step,
                               self.options.join_window_s,
                               self.options.controller.rebuild_budget_s)
            if old is not None:
                self.controller.handle(JoinRequested(joiner))
            self.controller.handle(PeerFenced(new.epoch))
            self.controller.handle(RebuildStarted(new.epoch))
            if old is None:
                peer = next(r for r in new.members if r != self.id)
                self.step = int(self.store.get(keys.admission_step(self.group, new.epoch, peer)))
            self._adopt(old or self.members, new)
            # As after an idle rebuild: the new communicator's rendezvous took every member,
            # so the epoch can serve (an idle group must not wait in READY for a request).
            self.served()
            logger.warning("rank %d: %s rank %d at epoch %d, members %s, in %.3fs (computes "
                           "experts %s)", self.id, "joined as" if old is None else "admitted",
                           joiner, new.epoch, list(new.members), time.monotonic() - started,
                           list(new.placement[self.id]))
            return new

    def leave_for_rejoin(self) -> None:
        """A fenced-out rank becomes a joiner: alone, keeping its experts, until admitted."""
        with self._lock:
            self.transport.abort()
            self._fenced_out = None
            held = self.members.placement.get(self.id, ())
            self.members = ms.Membership(-1, (self.id,), {self.id: tuple(held)}, -1)

    # ---------------------------------------------------- idle rebuild
    def _maybe_rebuild_while_idle(self) -> None:
        """Watcher thread, after each tick: an idle rank whose peer failed (or whose group
        moved on) rebuilds now, so the group is ready before the next request comes."""
        if (self.experts is None or self.joining or not self.watchdog.peer_failed()
                or self._fenced_out is not None or self._admission_coming()):
            return
        if self._idle_rebuild is not None and self._idle_rebuild.is_alive():
            return
        with self._lock:
            if self._step_depth:
                return  # the step meets the fault itself and recovers in place
        self._idle_rebuild = threading.Thread(target=self._rebuild_while_idle,
                                              name="elastic-ft-idle-rebuild", daemon=True)
        self._idle_rebuild.start()

    def _admission_coming(self) -> bool:
        """The group moved one epoch on for an admission and no peer was named: this rank's
        own admit call is on its way (recovering on its own here would fence once more
        and leave the engines' DP sync at two different epochs)."""
        epoch = self.watchdog.group_epoch
        return (not self.watchdog.peer_named() and epoch == self.members.epoch + 1
                and epochs.is_admission(self.store, self.group, epoch))

    def _rebuild_while_idle(self) -> None:
        with self._lock:
            if self._step_depth or not self.watchdog.peer_failed() or self._admission_coming():
                return
            try:
                self.recover("a peer failed while this rank was idle")
                # The new communicator's rendezvous took every member: the epoch can
                # serve. Mark it so, or an idle group sits in READY until a request
                # comes (and an orchestrator's budget would age it into a restart).
                self.served()
            except FencedError as err:
                self._fenced_out = err  # the next step raises it: this rank must leave
            except GroupFailedError as err:
                self._fenced_out = err  # FAILED is final: the next step raises it
            except Exception:
                logger.exception("rank %d: rebuild while idle failed; the next step retries",
                                 self.id)

    def shutdown(self) -> None:
        self.transport.shutdown()
