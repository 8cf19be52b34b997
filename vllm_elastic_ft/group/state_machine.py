"""The DP group's state machine: a pure function of (now, view, event), torchft-style.

::

    HEALTHY -> SUSPECT -> FENCED -> REBUILDING -> READY -> HEALTHY
        \\_________\\_________\\___________\\__________-> FAILED

* a ``dead`` or ``hung`` report fences the group at once (epoch + 1); a
  ``slow`` report makes it SUSPECT, and ``slow_strikes`` of them fence it;
* a fault during REBUILDING fences again (a new epoch) while rebuild attempts
  remain, else FAILED; a rebuild past ``rebuild_budget_s`` is FAILED;
* every fenced epoch counts as one rebuild attempt, whoever fenced it (this
  rank's report, or a peer: ``PeerFenced``); a step served at the new epoch
  resets the count. This is the only place retries are decided: the recovery
  core (``group/member.py``) asks the state machine before every attempt;
* fewer live ranks than ``min_live_ranks`` is FAILED: nothing waits forever.

Every call returns the next view and a reason string; the controller logs it
as one structured event. Nothing here touches a process, a clock or a store.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Union


class GroupState(str, enum.Enum):
    HEALTHY = "HEALTHY"
    SUSPECT = "SUSPECT"
    FENCED = "FENCED"
    REBUILDING = "REBUILDING"
    READY = "READY"
    FAILED = "FAILED"


#: States in which the group must not take traffic.
NOT_SERVING = frozenset({GroupState.FENCED, GroupState.REBUILDING, GroupState.FAILED})


@dataclass(frozen=True)
class ControllerOptions:
    rebuild_budget_s: float = 30.0
    max_rebuilds: int = 3  # rebuild attempts per fault (a fault during a rebuild is one more)
    min_live_ranks: int = 1
    slow_strikes: int = 3


@dataclass(frozen=True)
class GroupView:
    group: str
    world_size: int
    live_ranks: tuple[int, ...]
    state: GroupState = GroupState.HEALTHY
    epoch: int = 0
    since: float = 0.0
    reason: str = "started"
    rebuild_started_at: float | None = None
    attempts: int = 0
    slow_strikes: int = 0
    suspects: tuple[int, ...] = ()

    @property
    def serving(self) -> bool:
        return self.state not in NOT_SERVING


# ----------------------------------------------------------------- events
@dataclass(frozen=True)
class Fault:
    """A FaultReport reached the controller."""

    epoch: int
    suspects: tuple[int, ...]
    kind: str  # dead | hung | slow
    reporter: int = -1


@dataclass(frozen=True)
class RebuildStarted:
    epoch: int


@dataclass(frozen=True)
class RebuildDone:
    epoch: int
    live_ranks: tuple[int, ...]


@dataclass(frozen=True)
class RebuildFailed:
    epoch: int
    reason: str


@dataclass(frozen=True)
class Served:
    """The rebuilt group completed a step at ``epoch``."""

    epoch: int


@dataclass(frozen=True)
class JoinRequested:
    """A replacement rank asks to join; the group fences to admit it."""

    rank: int


@dataclass(frozen=True)
class PeerFenced:
    """The store's epoch is ahead: another rank fenced the group first (or admitted us)."""

    epoch: int
    suspects: tuple[int, ...] = ()


@dataclass(frozen=True)
class Tick:
    pass


Event = Union[Fault, RebuildStarted, RebuildDone, RebuildFailed, Served, JoinRequested,
              PeerFenced, Tick]


def _moved(view: GroupView, now: float, state: GroupState, reason: str, **changes) -> GroupView:
    return replace(view, state=state, since=now, reason=reason, **changes)


def _fence(view: GroupView, now: float, suspects: tuple[int, ...], reason: str,
           options: ControllerOptions) -> GroupView:
    live = tuple(r for r in view.live_ranks if r not in suspects)
    attempts = view.attempts + 1
    if len(live) < options.min_live_ranks:
        return _moved(view, now, GroupState.FAILED,
                      f"{reason}; {len(live)} live rank(s) < min_live_ranks={options.min_live_ranks}",
                      live_ranks=live, suspects=suspects)
    if attempts > options.max_rebuilds:
        return _moved(view, now, GroupState.FAILED,
                      f"{reason}; rebuild attempts exhausted ({options.max_rebuilds})",
                      live_ranks=live, suspects=suspects)
    return _moved(view, now, GroupState.FENCED, reason, epoch=view.epoch + 1, live_ranks=live,
                  suspects=suspects, attempts=attempts, slow_strikes=0, rebuild_started_at=None)


def step(now: float, view: GroupView, event: Event, options: ControllerOptions) -> GroupView:
    """The view after ``event``; returns ``view`` itself when nothing changes."""
    if view.state is GroupState.FAILED:
        return view  # terminal: only a gang restart (a new controller) leaves it
    if isinstance(event, Fault):
        if event.epoch < view.epoch:
            return view  # a report about an epoch already fenced
        what = f"rank(s) {list(event.suspects)} {event.kind} (reported by {event.reporter})"
        if event.kind == "slow" and view.state in (GroupState.HEALTHY, GroupState.SUSPECT):
            strikes = view.slow_strikes + 1
            if strikes < options.slow_strikes:
                return _moved(view, now, GroupState.SUSPECT, f"{what}, strike {strikes}",
                              slow_strikes=strikes, suspects=event.suspects)
            return _fence(view, now, event.suspects, f"{what}, strike {strikes}", options)
        if view.state is GroupState.REBUILDING:
            return _fence(view, now, event.suspects, f"second fault during rebuild: {what}", options)
        if view.state is GroupState.FENCED:
            # Another report of the same fault, or a further dead rank: fold it in.
            extra = tuple(r for r in event.suspects if r in view.live_ranks)
            if not extra:
                return view
            live = tuple(r for r in view.live_ranks if r not in extra)
            if len(live) < options.min_live_ranks:
                return _moved(view, now, GroupState.FAILED, f"{what}; too few live ranks",
                              live_ranks=live)
            return replace(view, live_ranks=live, suspects=view.suspects + extra,
                           reason=f"{view.reason}; also {what}")
        return _fence(view, now, event.suspects, what, options)
    if isinstance(event, JoinRequested):
        if view.state not in (GroupState.HEALTHY, GroupState.READY):
            return view  # admit it at the next healthy moment
        fenced = _fence(view, now, (), f"rank {event.rank} asks to join", options)
        return replace(fenced, live_ranks=tuple(sorted(set(fenced.live_ranks) | {event.rank})))
    if isinstance(event, PeerFenced):
        if event.epoch <= view.epoch:
            return view
        live = tuple(r for r in view.live_ranks if r not in event.suspects)
        attempts = view.attempts + 1
        if attempts > options.max_rebuilds:
            return _moved(view, now, GroupState.FAILED,
                          f"fenced to epoch {event.epoch}; rebuild attempts exhausted "
                          f"({options.max_rebuilds})", epoch=event.epoch, live_ranks=live,
                          suspects=event.suspects)
        return _moved(view, now, GroupState.FENCED, f"fenced to epoch {event.epoch} by a peer",
                      epoch=event.epoch, live_ranks=live, suspects=event.suspects,
                      attempts=attempts, rebuild_started_at=None)
    if isinstance(event, RebuildStarted) and view.state is GroupState.FENCED and event.epoch == view.epoch:
        return _moved(view, now, GroupState.REBUILDING, f"rebuilding over ranks {list(view.live_ranks)}",
                      rebuild_started_at=now)
    if isinstance(event, RebuildDone) and view.state is GroupState.REBUILDING and event.epoch == view.epoch:
        return _moved(view, now, GroupState.READY,
                      f"rebuilt at epoch {event.epoch} over ranks {list(event.live_ranks)}",
                      live_ranks=event.live_ranks)
    if isinstance(event, RebuildFailed) and event.epoch >= view.epoch:
        # Any state: a rank that cannot rebuild at all (rebuild off, a transport
        # without an in-place tier) gives up from wherever it is.
        return _moved(view, now, GroupState.FAILED, f"rebuild failed: {event.reason}",
                      epoch=event.epoch)
    if isinstance(event, Served) and view.state is GroupState.READY and event.epoch == view.epoch:
        return _moved(view, now, GroupState.HEALTHY, f"serving at epoch {event.epoch}",
                      attempts=0, suspects=())
    if isinstance(event, Tick) and view.state in (GroupState.FENCED, GroupState.REBUILDING):
        started = view.rebuild_started_at if view.rebuild_started_at is not None else view.since
        if now - started > options.rebuild_budget_s:
            return _moved(view, now, GroupState.FAILED,
                          f"rebuild exceeded its budget of {options.rebuild_budget_s}s")
    return view
