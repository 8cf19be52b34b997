"""The orchestration hook: what an orchestrator implements to follow a group's failures.

The controller calls ``on_fenced`` when the group stops serving (take it out
of traffic), ``on_ready`` when it is rebuilt (put it back), and ``on_failed``
when in-engine recovery gave up (restart the gang). Calls must not block.
"""

from __future__ import annotations

from typing import Protocol

from vllm_elastic_ft.group.state_machine import GroupView
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)


class OrchestrationHook(Protocol):
    def on_fenced(self, view: GroupView, report: dict | None) -> None: ...
    def on_ready(self, view: GroupView) -> None: ...
    def on_failed(self, view: GroupView, reason: str) -> None: ...


class LoggingHook:
    """The default hook: one log line per call."""

    def on_fenced(self, view: GroupView, report: dict | None) -> None:
        logger.warning("group %s fenced at epoch %d: %s", view.group, view.epoch, view.reason)

    def on_ready(self, view: GroupView) -> None:
        logger.info("group %s ready at epoch %d over ranks %s", view.group, view.epoch,
                    list(view.live_ranks))

    def on_failed(self, view: GroupView, reason: str) -> None:
        logger.error("group %s FAILED at epoch %d: %s", view.group, view.epoch, reason)
