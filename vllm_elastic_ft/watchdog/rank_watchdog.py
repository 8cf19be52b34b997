"""RankWatchdog: a deadline around every dispatch/combine, heartbeats, and fault reports.

One watchdog per rank process. Its hot path is :meth:`begin` / :meth:`end`
around each guarded call: a sequence number and two atomic stores in the
native monitor (see ``deadline_monitor``). Everything slow happens on one
watcher thread, every ``heartbeat_interval_s``:

1. publish this rank's :class:`RankStatus` (``keys.heartbeat``);
2. read every peer's status and probe the peer processes on this host;
3. turn queued triggers (a missed deadline, a failed collective) and the
   liveness check into verdicts (``attribution.attribute``) and publish one
   :class:`FaultReport` per fault to the sink (and to the store, for the
   group controller).

A dead or stopped peer is therefore named within about one heartbeat interval
whether or not a collective is in flight; a live peer that falls behind is
named when this rank's call misses its deadline.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group.fencing import FencedError, current_epoch
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.watchdog import attribution
from vllm_elastic_ft.watchdog.attribution import RankStatus, Verdict
from vllm_elastic_ft.watchdog.deadline_monitor import PythonMonitor, make_monitor
from vllm_elastic_ft.watchdog.report import FaultKind, FaultReport, FaultSink, LogAndCountSink

logger = get_logger(__name__)

#: Bounded wait of a call that has no deadline (warm-up): vLLM's gloo default.
NO_DEADLINE_WAIT_S = 1800.0


@dataclass(frozen=True)
class WatchdogSettings:
    """The watchdog's share of ``ElasticFTConfig`` (same names, same units)."""

    deadline_s: float = 5.0
    warmup_calls: int = 200
    warmup_deadline_s: float = 0.0  # 0: no deadline during warm-up
    heartbeat_interval_s: float = 0.1
    heartbeat_stale_s: float = 2.0
    poll_interval_s: float = 0.005
    prefer_native: bool = True

    @classmethod
    def from_config(cls, config) -> WatchdogSettings:
        names = cls.__dataclass_fields__.keys() - {"poll_interval_s", "prefer_native"}
        return cls(**{n: getattr(config, n) for n in names},
                   prefer_native=getattr(config, "watchdog_native", True))


@dataclass
class _Trigger:
    kind: str  # "deadline" or "collective_error"
    op: str | None
    seq: int
    peer_closed: bool
    since: float  # time.monotonic() of the trigger


class RankWatchdog:
    """The watchdog of one rank of one group.

    Args:
        settings: deadlines and heartbeat timing.
        store: a ``torch.distributed.Store`` every rank of the group reaches,
            hosted outside the ranks (it must outlive any of them).
        group: the group's name (part of every store key).
        rank: this rank in the group.
        world_size: ranks in the group.
        epoch: the group epoch (part of every store key).
        sink: where reports go (default: log line + counters).
        injection: the fault-injection hook (``faults.injection``), only where a
            deployment switched ``fault_injection`` on; None reads no injection key.
    """

    def __init__(self, settings: WatchdogSettings, store, group: str, rank: int,
                 world_size: int, epoch: int = 0, sink: FaultSink | None = None,
                 injection=None):
        self.settings = settings
        self.store = store
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.sink = sink or LogAndCountSink()
        self.entered = 0
        self.finished = 0
        self.current_op: str | None = None
        self.injection = injection
        self._peer_fault_epoch = -1  # epoch in which a dead/hung peer was reported
        #: The group epoch last read from the store; ahead of ``epoch`` means
        #: this rank is fenced out and must not communicate.
        self.group_epoch = epoch
        #: When this rank moved to ``epoch`` (members that stay silent in it are named).
        self.epoch_began = time.time()
        #: Optional evidence source for a missed deadline: ranks a transport
        #: itself marked as silent (DeepEP's low-latency mask buffer).
        self.miss_suspects: Callable[[], list[int]] | None = None
        #: Called on the watcher thread after every tick (outside the watchdog's lock):
        #: how a rank that sits idle learns that its group needs a rebuild.
        self.after_tick: Callable[[], None] | None = None
        self._host = attribution.this_host()
        self._pid = attribution.this_pid()
        self._triggers: queue.SimpleQueue[_Trigger] = queue.SimpleQueue()
        self._pending: list[_Trigger] = []
        self._reported: set[tuple] = set()
        self._progress: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the watcher's tick against reconfigure()
        self._monitor = make_monitor(1, settings.poll_interval_s, self._on_miss,
                                     settings.prefer_native)
        self._thread = threading.Thread(target=self._watch, name=f"elastic-ft-watchdog-r{rank}",
                                        daemon=True)
        self._thread.start()
        logger.info("rank watchdog up: group=%s epoch=%d rank=%d/%d deadline=%.2fs "
                    "warm-up=%d calls monitor=%s", group, epoch, rank, world_size,
                    settings.deadline_s, settings.warmup_calls, self.monitor_backend)

    @property
    def monitor_backend(self) -> str:
        """``native`` or ``python``: which deadline monitor this watchdog runs on."""
        return "python" if isinstance(self._monitor, PythonMonitor) else "native"

    # ------------------------------------------------------------- hot path
    def begin(self, op: str) -> int:
        """Enter a guarded call; returns its seq. Pair with :meth:`end`.

        Raises:
            FencedError: the group moved to a newer epoch than this rank's.
        """
        if self.group_epoch > self.epoch:
            raise FencedError(self.group, self.rank, self.epoch, self.group_epoch)
        seq = self.entered = self.entered + 1
        self.current_op = op
        timeout = self.deadline_for(seq)
        if timeout:
            self._monitor.arm(0, timeout, seq)
        return seq

    def end(self, seq: int) -> None:
        self._monitor.disarm(0)
        self.finished = seq
        self.current_op = None

    def peer_failed(self) -> bool:
        """Whether a call of this epoch can stop waiting: a peer was named dead or
        hung, or the group was fenced past this rank's epoch. Cheap (two reads)."""
        return self.peer_named() or self.group_epoch > self.epoch

    def peer_named(self) -> bool:
        """Whether this rank's watchdog named a dead or hung peer in its current epoch."""
        return self._peer_fault_epoch == self.epoch

    def deadline_for(self, seq: int) -> float:
        """The deadline of call ``seq`` in seconds (0: none, warm-up)."""
        if seq <= self.settings.warmup_calls:
            return self.settings.warmup_deadline_s
        return self.settings.deadline_s

    def wait_timeout(self, seq: int) -> timedelta:
        """How long the collective of call ``seq`` may block before it errors."""
        return timedelta(seconds=self.deadline_for(seq) or NO_DEADLINE_WAIT_S)

    def collective_failed(self, op: str, seq: int, error: BaseException) -> bool:
        """Attribute a failed call; returns whether a peer closed its connection.

        A dead or stopped peer on this host is named right here, before the
        error leaves the call (the process may not live long after it: stock
        vLLM tears the deployment down on a worker error). Anything else is
        queued for the watcher, which waits for heartbeats to settle.
        """
        text = str(error).lower()
        peer_closed = any(s in text for s in ("closed", "reset by peer", "broken pipe", "eof"))
        trigger = _Trigger("collective_error", op, seq, peer_closed, time.monotonic())
        if not self._attribute_now(trigger):
            self._triggers.put(trigger)
        return peer_closed

    def _attribute_now(self, trig: _Trigger, settle_s: float = 0.1) -> bool:
        """Try, for up to ``settle_s``, to name a dead or hung peer now; report it."""
        deadline = time.monotonic() + settle_s
        while True:
            with self._lock:
                statuses, probes = self._look()
                verdict = attribution.attribute(time.time(), self.rank, statuses, probes, {},
                                                peer_closed=trig.peer_closed, **self._limits)
                if verdict is not None:
                    self._report(verdict, trig.kind, trig.op, trig.seq)
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _on_miss(self, slot: int, seq: int, overdue_s: float) -> None:
        # Runs on the monitor thread: enqueue only, never block.
        self._triggers.put(_Trigger("deadline", self.current_op, seq, False, time.monotonic()))

    # ------------------------------------------------------------- watcher
    def _watch(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while not self._stop.is_set():
            try:
                self._tick()
                if self.after_tick is not None:
                    self.after_tick()
            except Exception:  # a store hiccup must not kill the watchdog
                logger.exception("rank %d: watchdog tick failed", self.rank)
            try:
                self._pending.append(self._triggers.get(timeout=interval))
            except queue.Empty:
                pass

    def reconfigure(self, epoch: int, rank: int, world_size: int) -> None:
        """Move to a rebuilt group: new epoch, this rank's new index, new width."""
        with self._lock:
            self.epoch, self.rank, self.world_size = epoch, rank, world_size
            self.epoch_began = time.time()
            self.group_epoch = max(self.group_epoch, epoch)
            self._progress.clear()
            self._pending.clear()
            self._reported.clear()
        logger.info("rank watchdog: group=%s now epoch=%d rank=%d/%d", self.group, epoch, rank,
                    world_size)

    def _tick(self) -> None:
        with self._lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        self.group_epoch = max(self.group_epoch, current_epoch(self.store, self.group))
        if self.group_epoch > self.epoch:
            return  # fenced out: the old epoch's peers are no business of this rank
        self.store.set(keys.heartbeat(self.group, self.epoch, self.rank),
                       self._status().encode())
        statuses, probes = self._look()
        now = time.time()
        for rank, status in statuses.items():
            seen = self._progress.get(rank)
            if seen is None or seen[0] != status.finished:
                self._progress[rank] = (status.finished, now)
        if self.injection is not None:
            self.injection.refresh()
        progress_t = {r: t for r, (_, t) in self._progress.items()}
        verdict = attribution.attribute(now, self.rank, statuses, probes, progress_t, **self._limits)
        if verdict is None and self.epoch > 0:
            verdict = attribution.silent_members(
                now, self.rank, self.world_size, statuses, self.epoch_began,
                max(self.settings.heartbeat_stale_s, self.settings.deadline_s))
        if verdict is not None:
            self._report(verdict, "liveness", None, None)
        while True:
            try:
                self._pending.append(self._triggers.get_nowait())
            except queue.Empty:
                break
        still_pending = []
        for trig in self._pending:
            verdict = self._attribute_trigger(trig, now, statuses, probes, progress_t)
            if verdict is None:
                still_pending.append(trig)
            else:
                self._report(verdict, trig.kind, trig.op, trig.seq)
        self._pending = still_pending

    @property
    def _limits(self) -> dict[str, float]:
        """The staleness limits every attribution uses."""
        return dict(stale_s=self.settings.heartbeat_stale_s,
                    hung_s=2 * self.settings.heartbeat_interval_s)

    def _look(self) -> tuple[dict[int, RankStatus], dict[int, str]]:
        """Every rank's latest status, and a probe of each peer's process on this host."""
        statuses = self._read_statuses()
        probes = {r: attribution.local_probe(s, self._host)
                  for r, s in statuses.items() if r != self.rank}
        return statuses, probes

    def _attribute_trigger(self, trig: _Trigger, now: float, statuses, probes,
                           progress_t) -> Verdict | None:
        """The verdict for a missed deadline or failed collective, or None to look again."""
        dead_or_hung = attribution.attribute(now, self.rank, statuses, probes, progress_t,
                                             peer_closed=trig.peer_closed, **self._limits)
        if dead_or_hung is not None:
            return dead_or_hung
        masked = self._masked_ranks() if trig.kind == "deadline" else []
        if masked:
            return Verdict(tuple(masked), FaultKind.HUNG,
                           f"rank(s) {masked} marked silent by the transport's mask",
                           {r: "masked by the transport (DeepEP low-latency mask)" for r in masked})
        # A closed connection means a peer failed: wait for its heartbeat to go
        # stale before falling back to "who is behind" (published seqs lag by up
        # to one interval, so right after the error every peer looks behind).
        # A timeout is a missed deadline: judge "who is behind" now, while the
        # late rank still is.
        waited = time.monotonic() - trig.since
        if trig.peer_closed and waited < self.settings.heartbeat_stale_s:
            return None
        return attribution.attribute(
            now, self.rank, statuses, probes, progress_t, peer_closed=trig.peer_closed,
            waiting_seq=trig.seq, deadline_s=self.deadline_for(trig.seq) or None, **self._limits)

    def _masked_ranks(self) -> list[int]:
        if self.miss_suspects is None:
            return []
        try:
            return [r for r in self.miss_suspects() if r != self.rank]
        except Exception:
            logger.exception("rank %d: reading the transport's mask failed", self.rank)
            return []

    def _status(self, state: str = "running") -> RankStatus:
        return RankStatus(self.rank, self._pid, self._host, time.time(), self.entered,
                          self.finished, state)

    def _read_statuses(self) -> dict[int, RankStatus]:
        wanted = [keys.heartbeat(self.group, self.epoch, r) for r in range(self.world_size)]
        present = [k for k in wanted if self.store.check([k])]
        values = self.store.multi_get(present) if present else []
        return {s.rank: s for s in (RankStatus.decode(v) for v in values)}

    def _report(self, verdict: Verdict, trigger: str, op: str | None, seq: int | None) -> None:
        # One report per fault: per suspect set and kind, and per missed call.
        key = (verdict.suspects, verdict.kind) if trigger == "liveness" else (trigger, seq)
        if key in self._reported or (verdict.suspects, verdict.kind) in self._reported:
            return
        self._reported.add(key)
        self._reported.add((verdict.suspects, verdict.kind))
        if verdict.kind in (FaultKind.DEAD, FaultKind.HUNG) and self.rank not in verdict.suspects:
            self._peer_fault_epoch = self.epoch
        report = FaultReport(
            group=self.group, epoch=self.epoch, reporter=self.rank, suspects=verdict.suspects,
            kind=verdict.kind, trigger=trigger, reason=verdict.reason, detected_at=time.time(),
            op=op, seq=seq, evidence={str(k): v for k, v in verdict.evidence.items()},
        )
        self.sink.publish(report)
        try:
            self.store.set(keys.fault_report(self.group, self.epoch, self.rank), report.to_json())
        except Exception:
            logger.exception("rank %d: could not store the fault report", self.rank)

    # ------------------------------------------------------------- life
    def shutdown(self, clean: bool = True) -> None:
        """Stop the watcher and the monitor; ``clean`` tells peers this rank left on purpose."""
        if self._stop.is_set():
            return
        if clean:
            # One last look at the peers: a process torn down because a peer
            # died (stock vLLM's cascade) still names that peer on its way out.
            try:
                self._tick()
            except Exception:
                pass
        self._stop.set()
        self._thread.join(timeout=5)
        self._monitor.stop()
        if clean:
            try:
                self.store.set(keys.heartbeat(self.group, self.epoch, self.rank),
                               self._status("left").encode())
            except Exception:
                pass
