"""Follow a DP group's faults and rebuilds from the store, into a GroupController.

The front end (API server) does not run collectives; it learns what happens
to its group from what the ranks write into the watchdog store: FaultReports
of each epoch, the epoch itself, an agreed membership and, once the first
step of that epoch ran, its serving mark (``comm/keys.py``). One thread polls
them every ``poll_s`` and feeds its controller, whose view is what
``/elastic_ft/status``, ``/health`` and ``/metrics`` show.
"""

from __future__ import annotations

import json
import threading

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group.controller import GroupController
from vllm_elastic_ft.group.fencing import current_epoch
from vllm_elastic_ft.group.state_machine import (
    PeerFenced, RebuildDone, RebuildFailed, RebuildStarted, Served, Tick,
)
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)


class StoreFollower:
    def __init__(self, store, controller: GroupController, poll_s: float = 0.1):
        self.store = store
        self.controller = controller
        self.poll_s = poll_s
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elastic-ft-follower", daemon=True)

    def start(self) -> StoreFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a store hiccup must not end the follower
                logger.exception("group %s: following the store failed", self.controller.view.group)

    def poll(self) -> None:
        """One look at the store (also called directly by tests)."""
        view = self.controller.view
        group = view.group
        for key in [keys.fault_report(group, view.epoch, r) for r in range(view.world_size)]:
            if key in self._seen or not self.store.check([key]):
                continue
            self._seen.add(key)
            self.controller.fault(json.loads(self.store.get(key)))
        epoch = current_epoch(self.store, group)
        if epoch > self.controller.view.epoch:
            self.controller.handle(PeerFenced(epoch))
        members_key = keys.members(group, self.controller.view.epoch)
        if self.controller.view.epoch > 0 and self.store.check([members_key]):
            members = tuple(json.loads(self.store.get(members_key))["members"])
            self.controller.handle(RebuildStarted(self.controller.view.epoch))
            self.controller.handle(RebuildDone(self.controller.view.epoch, members))
            # A member ran the first step of the epoch: the group serves again.
            if self.store.check([keys.serving(group, self.controller.view.epoch)]):
                self.controller.handle(Served(self.controller.view.epoch))
        failed_key = keys.failed(group, self.controller.view.epoch)
        if self.store.check([failed_key]):  # a rank gave up (e.g. its transport cannot rebuild)
            self.controller.handle(RebuildFailed(self.controller.view.epoch,
                                                 self.store.get(failed_key).decode()))
        self.controller.handle(Tick())
