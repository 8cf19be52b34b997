"""FaultReport: what the watchdog says when a rank of a group fails, and where it says it.

One report names the suspect rank(s) and what is wrong with them (dead, hung
or slow), with the evidence it was based on. Every report goes to the
process's :class:`FaultSink`; the default one logs a line and counts. The group
controller plugs in its own sink to consume reports.
"""

from __future__ import annotations

import enum
import json
import threading
from dataclasses import asdict, dataclass, field
from typing import Protocol

from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)


class FaultKind(str, enum.Enum):
    DEAD = "dead"  # the process is gone (or its peer socket closed and it stopped beating)
    HUNG = "hung"  # the process exists but makes no progress (stopped, deadlocked)
    SLOW = "slow"  # alive and progressing, but a call missed its deadline


@dataclass(frozen=True)
class FaultReport:
    """One rank's finding about a fault in its group.

    Attributes:
        group: the DP group's name.
        epoch: the group epoch the fault happened in.
        reporter: the rank that wrote the report.
        suspects: ranks found at fault (empty only when nobody could be named).
        kind: dead, hung or slow.
        trigger: what started the check: ``liveness`` (heartbeat watcher),
            ``deadline`` (a dispatch/combine missed its deadline) or
            ``collective_error`` (the collective itself failed).
        op: the call in flight (``dispatch``, ``combine``), if any.
        seq: sequence number of that call.
        evidence: per-suspect facts the verdict rests on.
        reason: one human sentence.
        detected_at: wall-clock time (``time.time()``) of the verdict.
    """

    group: str
    epoch: int
    reporter: int
    suspects: tuple[int, ...]
    kind: FaultKind
    trigger: str
    reason: str
    detected_at: float
    op: str | None = None
    seq: int | None = None
    evidence: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["kind"] = self.kind.value
        return json.dumps(data, sort_keys=True, default=str)


class FaultSink(Protocol):
    def publish(self, report: FaultReport) -> None: ...


class LogAndCountSink:
    """The default sink: one ERROR log line per report, and counters by kind.

    ``reports`` keeps the newest :attr:`max_reports` reports (the recovery core reads
    only the current epoch's); ``total`` and ``counts`` count every one.
    """

    #: A rank's watchdog publishes about one report per fault for the life of its
    #: process: kept unbounded, a survivor of many fault + replace cycles held every
    #: one of them (issue 12). Every report is also in the log and the store.
    max_reports = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reports: list[FaultReport] = []
        self.counts: dict[str, int] = {k.value: 0 for k in FaultKind}
        self._total = 0

    def publish(self, report: FaultReport) -> None:
        with self._lock:
            self.reports.append(report)
            if len(self.reports) > self.max_reports:
                # A new list, not an in-place delete: the recovery core iterates the
                # reports on another thread and must not skip one.
                self.reports = self.reports[-self.max_reports:]
            self.counts[report.kind.value] += 1
            self._total += 1
            total = self._total
        logger.error(
            "FaultReport #%d group=%s epoch=%d rank=%d suspects=%s kind=%s trigger=%s: %s | %s",
            total, report.group, report.epoch, report.reporter, list(report.suspects),
            report.kind.value, report.trigger, report.reason, report.to_json(),
        )

    @property
    def total(self) -> int:
        """Reports published so far (``reports`` may keep fewer)."""
        return self._total


class RankFaultError(RuntimeError):
    """A guarded dispatch/combine failed or missed its deadline.

    Raised on the calling thread instead of blocking; the watchdog has already
    queued the attribution, which its report will carry.
    """

    def __init__(self, message: str, *, op: str, seq: int, peer_closed: bool):
        super().__init__(message)
        self.op = op
        self.seq = seq
        self.peer_closed = peer_closed
