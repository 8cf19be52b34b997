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

Every call has a finite deadline:

* **warm-up** calls (vLLM's profile run and first dummy runs, before the engine
  serves) get ``warmup_deadline_s``; where that is 0 ("no deadline") they get a
  finite fallback instead, ``WatchdogSettings.warmup_fallback_s`` or, unset, the
  larger of ``WARMUP_FALLBACK_FLOOR_S`` (120 s) and ``WARMUP_FALLBACK_FACTOR`` (10)
  x ``deadline_s``. Warm-up ends at :meth:`RankWatchdog.end_warmup` (the vLLM glue
  calls it when the engine starts serving) or after ``warmup_calls`` calls,
  whichever comes first;
* every later call gets the steady ``deadline_s``.

No error on the watcher thread passes silently. A value it reads that cannot be
used (a peer's heartbeat that does not decode, an injected delay that is not a
finite number >= 0, an unreadable epoch) is counted in
:attr:`RankWatchdog.tick_errors` and logged once per (whose value, kind of
error) with the value, clipped; the rest of the tick goes on. A peer whose key
holds no valid heartbeat is aged from its last valid one (or from when this
rank first read the bad value), so the staleness rules judge it like any peer
that stopped beating. Any other failure of a tick is counted too and logged
once per failure streak and kind, with its traceback.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, replace
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

#: Bounded wait of a call whose deadline is 0 (only a ``deadline_s`` of 0, which
#: ``ElasticFTConfig`` never allows; warm-up always has a finite deadline): vLLM's
#: gloo default.
NO_DEADLINE_WAIT_S = 1800.0
#: The warm-up fallback where ``warmup_deadline_s`` is 0: the larger of this floor
#: and FACTOR x ``deadline_s``. The floor is the one the communicator's own timeout
#: has (``comm/elastic_group.MIN_PG_TIMEOUT_S``), for the same reason: start-up
#: collectives can begin tens of seconds apart across ranks on a loaded host
#: (compilation, profiling) and must not be cut as faults; a peer hung during
#: warm-up is still cut in minutes, not after NO_DEADLINE_WAIT_S.
WARMUP_FALLBACK_FLOOR_S = 120.0
WARMUP_FALLBACK_FACTOR = 10.0
#: How much of an unusable value a log line shows.
BAD_VALUE_SHOWN_CHARS = 200


@dataclass(frozen=True)
class WatchdogSettings:
    """The watchdog's share of ``ElasticFTConfig`` (same names, same units)."""

    deadline_s: float = 5.0
    warmup_calls: int = 200
    warmup_deadline_s: float = 0.0  # 0: the finite fallback below
    heartbeat_interval_s: float = 0.1
    heartbeat_stale_s: float = 2.0
    poll_interval_s: float = 0.005
    prefer_native: bool = True
    #: Deadline of a warm-up call where ``warmup_deadline_s`` is 0; 0: the larger of
    #: WARMUP_FALLBACK_FLOOR_S and WARMUP_FALLBACK_FACTOR x ``deadline_s``. Not an
    #: ``ElasticFTConfig`` setting (tests and benchmarks set it).
    warmup_fallback_s: float = 0.0  # last: positional callers keep working
    #: How a tick finds its peers' heartbeat keys: ``batched`` (one ``check`` of every
    #: key known to exist in this epoch, one per key only for ranks not seen yet: O(1)
    #: store requests per tick once every rank beats) or ``per_peer`` (one ``check``
    #: per peer and tick, the design before: O(N) per rank, O(N^2) on the store).
    #: Both then read every existing key in one ``multi_get``. Not an
    #: ``ElasticFTConfig`` setting (``benchmarks/control_plane_scale.py`` compares them).
    peer_reads: str = "batched"

    @property
    def warmup_limit_s(self) -> float:
        """The deadline of a warm-up call: never 0 (no deadline)."""
        if self.warmup_deadline_s:
            return self.warmup_deadline_s
        return self.warmup_fallback_s or max(WARMUP_FALLBACK_FLOOR_S,
                                             WARMUP_FALLBACK_FACTOR * self.deadline_s)

    @classmethod
    def from_config(cls, config) -> WatchdogSettings:
        names = cls.__dataclass_fields__.keys() - {"poll_interval_s", "prefer_native",
                                                   "warmup_fallback_s", "peer_reads"}
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
        host: the host name this rank publishes (default: this machine's). Peers
            probe ``/proc`` only for ranks that publish their own host name; others
            are judged by heartbeat staleness (a benchmark groups ranks of one
            machine into virtual hosts with it, as ranks of several machines).
    """

    def __init__(self, settings: WatchdogSettings, store, group: str, rank: int,
                 world_size: int, epoch: int = 0, sink: FaultSink | None = None,
                 injection=None, host: str | None = None):
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
        #: Calls up to this seq are warm-up; :meth:`end_warmup` lowers it.
        self._warmup_last_seq = settings.warmup_calls
        #: Errors on the watcher thread (unusable values read, failed ticks), in
        #: total and per kind (``"heartbeat:JSONDecodeError"``, ``"tick:TimeoutError"``).
        self.tick_errors = 0
        self.tick_errors_by_kind: dict[str, int] = {}
        self._errors_lock = threading.Lock()  # counted on the watcher and on calling threads
        self._logged_bad: set[tuple[str, str]] = set()  # (whose value, kind) logged once
        self._failing: dict[str, int] = {}  # failure streak per step of the watcher
        self._logged_failing: set[str] = set()  # step:kind logged in the current streak
        #: Per rank: its last valid status and when this rank first read it (wall clock).
        self._heard: dict[int, tuple[RankStatus, float]] = {}
        #: When this rank's last tick got through to the store (None: none in this epoch).
        self._last_tick_answered: float | None = None
        #: Ranks whose heartbeat key exists in this epoch (keys are never deleted in one).
        self._beating: set[int] = set()
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
        self._host = host or attribution.this_host()
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
                    "warm-up=%d calls (or until end_warmup()) at %.2fs monitor=%s", group,
                    epoch, rank, world_size, settings.deadline_s, settings.warmup_calls,
                    settings.warmup_limit_s, self.monitor_backend)

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

    def end_warmup(self) -> None:
        """Warm-up is over: every call entered from now on gets the steady ``deadline_s``.

        The vLLM glue calls this when the engine starts serving (after the
        profile run and the warm-up dummy runs); until then, or at most for
        ``warmup_calls`` calls, calls get the warm-up deadline. A call already
        in flight keeps the deadline it was armed with. Idempotent; callable
        from any thread.
        """
        last = min(self._warmup_last_seq, self.entered)
        if last < self._warmup_last_seq:
            self._warmup_last_seq = last
            logger.info("rank %d: warm-up over after %d guarded calls; deadline %.2fs from now on",
                        self.rank, last, self.settings.deadline_s)

    @property
    def warming_up(self) -> bool:
        """Whether the next guarded call gets the warm-up deadline."""
        return self.entered < self._warmup_last_seq

    def deadline_for(self, seq: int) -> float:
        """The deadline of call ``seq`` in seconds (warm-up or steady; finite)."""
        if seq <= self._warmup_last_seq:
            return self.settings.warmup_limit_s
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
            self._step("tick", self._tick)
            if self.after_tick is not None:
                self._step("after_tick", self.after_tick)
            try:
                self._pending.append(self._triggers.get(timeout=interval))
            except queue.Empty:
                pass

    def _step(self, name: str, step: Callable[[], None]) -> None:
        """Run one step of the watcher; a failure is counted and logged, never fatal.

        A store hiccup must not kill the watchdog, nor flood the log every
        heartbeat: the first failure of each kind in a streak is logged with its
        traceback, the rest at debug level, and the end of the streak once.
        """
        try:
            step()
        except Exception as err:
            kind = f"{name}:{type(err).__name__}"
            self._count_error(kind)
            self._failing[name] = self._failing.get(name, 0) + 1
            if kind in self._logged_failing:
                logger.debug("rank %d: watchdog %s failed again: %s", self.rank, name, err)
            else:
                self._logged_failing.add(kind)
                logger.exception("rank %d: watchdog %s failed (counted in tick_errors; logged "
                                 "once until it works again)", self.rank, name)
            return
        failed = self._failing.pop(name, 0)
        if failed:
            self._logged_failing = {k for k in self._logged_failing
                                    if not k.startswith(f"{name}:")}
            logger.warning("rank %d: watchdog %s works again after %d failed attempt(s)",
                           self.rank, name, failed)

    def _count_error(self, kind: str) -> None:
        with self._errors_lock:
            self.tick_errors += 1
            self.tick_errors_by_kind[kind] = self.tick_errors_by_kind.get(kind, 0) + 1

    def _bad_value(self, source: str, whose: str, value: object, err: Exception) -> None:
        """Count a value read on the tick that cannot be used; log it once per (whose, kind)."""
        kind = f"{source}:{type(err).__name__}"
        self._count_error(kind)
        if (whose, kind) in self._logged_bad:
            return
        self._logged_bad.add((whose, kind))
        logger.error("rank %d: %s is unusable (%s: %s), value %s; set aside (logged once per "
                     "value owner and kind of error, counted in tick_errors)", self.rank, whose,
                     type(err).__name__, _clip(str(err)), _clip(repr(value)))

    def reconfigure(self, epoch: int, rank: int, world_size: int) -> None:
        """Move to a rebuilt group: new epoch, this rank's new index, new width."""
        with self._lock:
            self.epoch, self.rank, self.world_size = epoch, rank, world_size
            self.epoch_began = time.time()
            self.group_epoch = max(self.group_epoch, epoch)
            self._progress.clear()
            self._pending.clear()
            self._reported.clear()
            self._heard.clear()  # the new epoch's keys, and ranks renumbered
            self._last_tick_answered = None
            self._beating.clear()
            self._logged_bad.clear()
        logger.info("rank watchdog: group=%s now epoch=%d rank=%d/%d", self.group, epoch, rank,
                    world_size)

    def _tick(self) -> None:
        with self._lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        self.group_epoch = max(self.group_epoch, self._read_group_epoch())
        # Beat even when fenced: while the group agrees on the next epoch, a heartbeat
        # that stops means a process that cannot reach the store (a cut-off node), not
        # a survivor on its way to register (see silent_peers).
        self.store.set(keys.heartbeat(self.group, self.epoch, self.rank),
                       self._status().encode())
        self._discount_own_gap(time.time())
        if self.group_epoch > self.epoch:
            return  # fenced out: the old epoch's peers are no business of this rank
        statuses, probes = self._look()
        now = time.time()
        for rank, status in statuses.items():
            seen = self._progress.get(rank)
            if seen is None or seen[0] != status.finished:
                self._progress[rank] = (status.finished, now)
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
        if self.injection is not None:  # last: the verdicts above never wait on it
            self._refresh_injection()

    def silent_peers(self) -> list[int]:
        """The peers (group ranks of this epoch) that are dead, or have not beaten for
        ``heartbeat_stale_s``, now: the rules of a liveness verdict, asked on demand.

        An agreement's leader asks this while it waits (``membership.agree``): when a
        node is cut off, the first report may name one of its ranks, and the others'
        heartbeats go stale a moment later, when nobody reports any more. Survivors
        keep beating while fenced, so they never look silent here.
        """
        with self._lock:
            statuses, probes = self._look()
            now = time.time()
            return [rank for rank, status in sorted(statuses.items()) if rank != self.rank
                    and attribution.classify_peer(now, status, probes.get(rank, "unknown"),
                                                  status.t, peer_closed=False,
                                                  **self._limits)[0] is not None]

    def _read_group_epoch(self) -> int:
        """The group's epoch in the store; this rank's last one if the key is unusable.

        (A rank that stopped beating over a bad epoch value would be named hung
        by every peer.)"""
        try:
            return current_epoch(self.store, self.group)
        except ValueError as err:
            self._bad_value("epoch", f"group {self.group!r}'s epoch",
                            self.store.get(keys.epoch(self.group)), err)
            return self.group_epoch

    def _refresh_injection(self) -> None:
        """Re-read the injected 'slow' delay, only if it is a finite number >= 0.

        ``FaultInjection.refresh`` would raise on a non-number, and take inf,
        nan or a negative delay, which ``time.sleep`` then raises on in the
        serving path: such a value is set aside and the last good delay kept.
        """
        key = keys.inject_slow(self.injection.group, self.injection.rank_id)
        raw = self.store.get(key) if self.store.check([key]) else None
        try:
            delay = float(raw) if raw is not None else 0.0
            if not (math.isfinite(delay) and delay >= 0):
                raise ValueError(f"delay {delay!r} is not a finite number >= 0")
            self.injection.refresh()
        except ValueError as err:
            self._bad_value("injection", f"rank {self.injection.rank_id}'s injected slow delay",
                            raw, err)

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
        """The status of every rank that published a key in this epoch, as this rank judges it.

        A key that holds no valid status counts as no heartbeat from that rank
        this tick: the rank keeps its last valid status (or, if it never had one,
        a placeholder from when this rank first read the bad value), so it ages
        into the staleness rules like any rank that stopped beating. And no status
        is younger than when this rank first read it: a clock ahead, or a bogus
        ``t``, cannot keep a heartbeat that no longer changes fresh forever.
        """
        ranks = self._beating_ranks()
        values = (self.store.multi_get([keys.heartbeat(self.group, self.epoch, r) for r in ranks])
                  if ranks else [])
        now = time.time()
        return {rank: self._heard_from(rank, self._decoded(rank, raw), now)
                for rank, raw in zip(ranks, values)}

    def _discount_own_gap(self, now: float) -> None:
        """Time in which this rank's ticks could not reach the store is no peer's silence
        (called once per tick, once the store answered it).

        When this rank's watcher stalls, or the store does (every client's reads and
        writes wait, then the queued reads are answered before a peer's queued beat),
        a peer's heartbeat was not seen to stop, only not seen: the first read after
        the gap finds the value of before it, and measured as it was, the gap would
        count as the peer's silence. The part of the gap beyond one interval is taken
        off every peer's age; a peer that really stopped still ages, at the rate this
        rank can watch it. (This rank's own stall is logged: its peers cannot discount
        it, and may name it hung.)"""
        last, self._last_tick_answered = self._last_tick_answered, now
        if last is None:
            return
        interval = self.settings.heartbeat_interval_s
        excess = now - last - interval
        if excess <= interval:
            return
        if excess > self.settings.heartbeat_stale_s / 2:
            # This rank's own beats stopped as long: its peers may name it hung.
            logger.warning("rank %d: the watcher could not reach the store for %.2fs (its "
                           "thread, or the store, stalled); not counted against its peers",
                           self.rank, excess + interval)
        self._heard = {rank: (status, first_read + excess)
                       for rank, (status, first_read) in self._heard.items()}

    def _beating_ranks(self) -> list[int]:
        """The ranks that have a heartbeat key in this epoch (``settings.peer_reads``).

        ``batched``: the keys already known to exist are checked in one request
        (``check`` of several keys is true when all exist), only the ranks not seen
        yet one by one; once every rank beats, a tick costs O(1) requests, not one
        per peer. Should the batch come back false (a key gone: nothing deletes one
        within an epoch), every key is checked one by one again, as ``per_peer`` does.
        """
        hb = [keys.heartbeat(self.group, self.epoch, r) for r in range(self.world_size)]
        if self.settings.peer_reads == "per_peer":
            return [r for r in range(self.world_size) if self.store.check([hb[r]])]
        if self._beating and not self.store.check([hb[r] for r in sorted(self._beating)]):
            self._beating.clear()
        self._beating.update(r for r in range(self.world_size)
                             if r not in self._beating and self.store.check([hb[r]]))
        return sorted(self._beating)

    def _decoded(self, rank: int, raw: bytes) -> RankStatus | None:
        """Rank ``rank``'s status from its key, or None (counted, logged once) if unusable."""
        try:
            status = RankStatus.decode(raw)
            if status.rank != rank:
                raise ValueError(f"the status under rank {rank}'s key is rank {status.rank}'s")
            return status
        except ValueError as err:
            self._bad_value("heartbeat", f"rank {rank}'s heartbeat", raw, err)
            return None

    def _heard_from(self, rank: int, status: RankStatus | None, now: float) -> RankStatus:
        """The status to judge ``rank`` by: ``status`` (None: no valid one this tick), timed
        by when this rank first read that value, on this rank's own clock.

        A heartbeat's age is how long its value has not changed (each beat writes a new
        one), never this clock minus the writer's: across hosts the two clocks differ, and
        a peer whose clock is behind by more than ``heartbeat_stale_s`` would look stale
        while it beats, one ahead would look fresh after it died (issue 13). It costs at
        most one read interval of detection."""
        heard = self._heard.get(rank)
        if status is None:
            if heard is None:  # never a valid one: unknown process, beating until now
                heard = self._heard[rank] = (RankStatus(rank, 0, "", now, 0, 0), now)
        elif heard is None or heard[0] != status:
            heard = self._heard[rank] = (status, now)
        status, first_read = heard
        return replace(status, t=first_read)

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
            except Exception as err:  # often the store went first: a line, no traceback
                self._count_error(f"tick:{type(err).__name__}")
                logger.warning("rank %d: last look at the peers before shutdown failed: %s",
                               self.rank, err)
        self._stop.set()
        self._thread.join(timeout=5)
        self._monitor.stop()
        if clean:
            try:
                self.store.set(keys.heartbeat(self.group, self.epoch, self.rank),
                               self._status("left").encode())
            except Exception as err:  # peers will judge this rank by staleness instead
                logger.warning("rank %d: could not publish that it left cleanly: %s",
                               self.rank, err)


def _clip(text: str, limit: int = BAD_VALUE_SHOWN_CHARS) -> str:
    """``text``, cut to ``limit`` characters (an unusable value may be large)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
