"""GroupController: one per DP group; applies events to the state machine, says so, calls hooks.

Every transition becomes one structured event (group, epoch, rank, event,
state, reason, t): logged and kept in ``events`` (the drill's timeline comes
from them), the newest ``GroupController.max_events`` of them. The controller
is cheap and holds no thread; whoever owns it feeds it events (fault reports,
rebuild progress, ticks).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Callable

from vllm_elastic_ft.group.hooks import LoggingHook, OrchestrationHook
from vllm_elastic_ft.group.state_machine import (
    ControllerOptions, Event, Fault, GroupState, GroupView, step,
)
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)


class GroupController:
    """The state of one DP group, seen from one process (a rank or the front end)."""

    #: How many events ``events`` keeps (the newest). Every fault + replace cycle adds
    #: about 8, for the life of the process: unbounded, a long-lived survivor's list
    #: grew ~3 KiB per cycle forever (issue 12, ``benchmarks/harness_soak.py``). The
    #: status endpoint shows the last 20; every event is also in the log.
    max_events = 256

    def __init__(self, group: str, world_size: int, options: ControllerOptions | None = None,
                 hook: OrchestrationHook | None = None, rank: int = -1,
                 clock: Callable[[], float] = time.time):
        self.options = options or ControllerOptions()
        self.hook = hook or LoggingHook()
        self.rank = rank
        self.clock = clock
        self._lock = threading.Lock()
        self.view = GroupView(group, world_size, tuple(range(world_size)), since=clock())
        self.events: list[dict] = []
        self.last_report: dict | None = None
        self._record("start", self.view)

    def handle(self, event: Event, report: dict | None = None) -> GroupView:
        """Apply ``event``; log, publish and call the hook if the state moved."""
        with self._lock:
            before = self.view
            if report is not None:
                self.last_report = report
            after = step(self.clock(), before, event, self.options)
            if after is before:
                return before
            self.view = after
            self._record(type(event).__name__, after)
        if after.state is not before.state:
            self._call_hook(before, after)
        return after

    def fault(self, report: dict) -> GroupView:
        """A FaultReport (as its dict) reached the controller."""
        return self.handle(Fault(report["epoch"], tuple(report["suspects"]), report["kind"],
                                 report.get("reporter", -1)), report)

    def _call_hook(self, before: GroupView, after: GroupView) -> None:
        try:
            if after.state is GroupState.FENCED:
                self.hook.on_fenced(after, self.last_report)
            elif after.state is GroupState.READY:
                self.hook.on_ready(after)
            elif after.state is GroupState.FAILED:
                self.hook.on_failed(after, after.reason)
        except Exception:  # an orchestrator's bug must not stop recovery
            logger.exception("group %s: orchestration hook failed", after.group)

    def _record(self, event_name: str, view: GroupView) -> None:
        event = {"group": view.group, "epoch": view.epoch, "rank": self.rank, "event": event_name,
                 "state": view.state.value, "reason": view.reason, "t": view.since,
                 "live_ranks": list(view.live_ranks)}
        self.events.append(event)
        if len(self.events) > self.max_events:
            # A new list, not an in-place delete: a reader on another thread that
            # iterates the old one is not shifted under its feet.
            self.events = self.events[-self.max_events:]
        logger.warning("group %s rank %d epoch %d: %s -> %s (%s)", view.group, self.rank,
                       view.epoch, event_name, view.state.value, view.reason)

    def status(self) -> dict:
        """What ``GET /elastic_ft/status`` shows."""
        view = asdict(self.view)
        view["state"] = self.view.state.value
        view["serving"] = self.view.serving
        view["last_report"] = self.last_report
        return view
