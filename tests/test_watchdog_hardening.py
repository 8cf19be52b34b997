"""Every error path of the rank watchdog ends in a state, in bounded time.

Real watchdogs on a real TCPStore (127.0.0.1, port 0), real gloo groups for the
deadline tests. What a bad value in the store does to the watcher's tick (it is
counted, logged once, and set aside; the other peers are still attributed; the
bad peer ages into the staleness rules), and that the warm-up grace ends at
``end_warmup()`` and is finite even where ``warmup_deadline_s`` is 0.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.transport import GlooTransport
from vllm_elastic_ft.faults.injection import FaultInjection
from vllm_elastic_ft.watchdog import rank_watchdog
from vllm_elastic_ft.watchdog.attribution import RankStatus, this_host
from vllm_elastic_ft.watchdog.guarded import guarded_all_reduce
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings
from vllm_elastic_ft.watchdog.report import FaultKind, LogAndCountSink, RankFaultError

GROUP = "hard"
INTERVAL_S = 0.05
#: Longer than any test here: a peer is stale only where a test sets it shorter.
NEVER_STALE_S = 60.0
GARBAGE = b"not json {" * 400  # 4000 bytes: the log line must show a clipped value


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def _client(store) -> dist.TCPStore:
    """A connection of its own (a blocking get on a shared client would hold up the others)."""
    return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=30))


@pytest.fixture
def watchdog_log(caplog):
    """The watchdog's log records, each once (its logger sits under vLLM's, which stops
    propagation once vLLM configured logging: caplog's handler goes on it directly)."""
    log = logging.getLogger("vllm.elastic_ft.watchdog.rank_watchdog")
    saved = log.level, log.propagate
    log.addHandler(caplog.handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield caplog
    finally:
        log.removeHandler(caplog.handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _watchdog(store, rank: int, world: int, sink=None, injection=None,
              **over) -> RankWatchdog:
    settings = dict(deadline_s=1.0, warmup_calls=0, heartbeat_interval_s=INTERVAL_S,
                    heartbeat_stale_s=NEVER_STALE_S)
    return RankWatchdog(WatchdogSettings(**{**settings, **over}), _client(store), GROUP, rank,
                        world, sink=sink or LogAndCountSink(), injection=injection)


def _dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _publish(store, rank: int, value: bytes) -> None:
    store.set(keys.heartbeat(GROUP, 0, rank), value)


def _wait_for(what: str, ready, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not (result := ready()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def _reports_on(sink: LogAndCountSink, rank: int) -> list:
    return [r for r in list(sink.reports) if rank in r.suspects]


def _bad_value_lines(caplog, whose: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if whose in r.getMessage() and "unusable" in r.getMessage()]


# ------------------------------------------------------------- bad values in the store
def test_garbage_heartbeat_is_set_aside_logged_once_and_counted_while_a_death_is_named(
        store, watchdog_log):
    _publish(store, 1, GARBAGE)
    dead = RankStatus(2, _dead_pid(), this_host(), time.time(), 0, 0)
    _publish(store, 2, dead.encode())
    sink = LogAndCountSink()
    wd = _watchdog(store, 0, 3, sink)
    try:
        # (a) the dead peer is named although its neighbour's key is garbage
        report = _wait_for("rank 2 named", lambda: _reports_on(sink, 2))[0]
        assert report.kind is FaultKind.DEAD and report.suspects == (2,), report
        # (d) counted every tick it is read ...
        _wait_for("ten ticks", lambda: wd.tick_errors >= 10)
        assert wd.tick_errors_by_kind.get("heartbeat:JSONDecodeError", 0) >= 10, \
            wd.tick_errors_by_kind
    finally:
        wd.shutdown()
    # (c) ... but logged once, naming the rank and showing a clipped value
    lines = _bad_value_lines(watchdog_log, "rank 1's heartbeat")
    assert len(lines) == 1, [r.getMessage() for r in lines]
    message = lines[0].getMessage()
    assert "not json {" in message and "chars)" in message and len(message) < 1000, message
    # rank 1 is not stale yet (60 s): garbage alone names nobody
    assert _reports_on(sink, 1) == []


def test_a_peer_that_only_writes_garbage_is_named_hung_by_staleness(store):
    stale_s = 0.6
    _publish(store, 1, GARBAGE)
    written = time.time()
    sink = LogAndCountSink()
    wd = _watchdog(store, 0, 3, sink, heartbeat_stale_s=stale_s)
    healthy = _watchdog(store, 2, 3, heartbeat_stale_s=stale_s)  # beats, never named
    try:
        report = _wait_for("rank 1 named", lambda: _reports_on(sink, 1))[0]
        assert report.kind is FaultKind.HUNG and report.suspects == (1,), report
        assert "no heartbeat" in report.evidence["1"], report
        # judged by the normal rule: not before its (first unusable) heartbeat was stale_s old
        assert stale_s <= report.detected_at - written < stale_s + 10, report
        time.sleep(5 * INTERVAL_S)
        assert _reports_on(sink, 2) == [], "the healthy peer was named"
    finally:
        healthy.shutdown()
        wd.shutdown()


def test_a_heartbeat_that_never_changes_ages_even_if_it_claims_the_future(store):
    stale_s = 0.6
    # Well-formed but frozen, and an hour ahead: with its own ``t`` it would look
    # fresh for an hour.
    _publish(store, 1, RankStatus(1, 4242, "elsewhere", time.time() + 3600,
                                  0, 0).encode())
    read_from = time.time()
    sink = LogAndCountSink()
    wd = _watchdog(store, 0, 2, sink, heartbeat_stale_s=stale_s)
    try:
        report = _wait_for("rank 1 named", lambda: _reports_on(sink, 1))[0]
        assert report.kind is FaultKind.HUNG and report.suspects == (1,), report
        assert stale_s <= report.detected_at - read_from < stale_s + 10, report
        assert wd.tick_errors == 0, wd.tick_errors_by_kind  # well-formed: not an error
    finally:
        wd.shutdown()


def test_an_unusable_injected_delay_is_set_aside_and_the_tick_goes_on(store, watchdog_log):
    injection = FaultInjection(_client(store), GROUP, 0)
    slow_key = keys.inject_slow(GROUP, 0)
    store.set(slow_key, "0.25")
    sink = LogAndCountSink()
    wd = _watchdog(store, 0, 2, sink, injection=injection)
    try:
        _wait_for("the delay read", lambda: injection.slow_delay_s == 0.25)
        for bad in ("not-a-number", "inf", "nan", "-1"):
            store.set(slow_key, bad)
            before = wd.tick_errors
            _wait_for(f"{bad!r} counted", lambda: wd.tick_errors >= before + 3)
            assert injection.slow_delay_s == 0.25, f"{bad!r} replaced the last good delay"
        # a death is still named while the value is bad
        _publish(store, 1, RankStatus(1, _dead_pid(), this_host(), time.time(), 0, 0).encode())
        report = _wait_for("rank 1 named", lambda: _reports_on(sink, 1))[0]
        assert report.kind is FaultKind.DEAD, report
        assert wd.tick_errors_by_kind["injection:ValueError"] == wd.tick_errors
        store.set(slow_key, "0.5")
        _wait_for("a good value taken again", lambda: injection.slow_delay_s == 0.5)
    finally:
        wd.shutdown()
    lines = _bad_value_lines(watchdog_log, "rank 0's injected slow delay")
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "not-a-number" in lines[0].getMessage()


def test_an_unusable_epoch_keeps_this_rank_beating(store):
    store.set(keys.epoch(GROUP), "garbage")
    wd = _watchdog(store, 0, 2)
    try:
        first = _wait_for("a heartbeat", lambda: store.check([keys.heartbeat(GROUP, 0, 0)])
                          and RankStatus.decode(store.get(keys.heartbeat(GROUP, 0, 0))).t)
        _wait_for("a later heartbeat", lambda: RankStatus.decode(
            store.get(keys.heartbeat(GROUP, 0, 0))).t > first)
        assert wd.tick_errors_by_kind.get("epoch:ValueError", 0) >= 1, wd.tick_errors_by_kind
        assert wd.group_epoch == 0 and not wd.peer_failed()
    finally:
        wd.shutdown()


def test_a_failing_step_is_logged_once_per_streak_and_counted(store, watchdog_log):
    failing = threading.Event()
    failing.set()

    def after_tick() -> None:
        if failing.is_set():
            raise RuntimeError("controller unreachable")

    wd = _watchdog(store, 0, 1)
    wd.after_tick = after_tick
    try:
        _wait_for("ten failures", lambda: wd.tick_errors_by_kind.get("after_tick:RuntimeError",
                                                                      0) >= 10)
        failing.clear()
        _wait_for("the streak to end", lambda: any(
            "works again" in r.getMessage() for r in watchdog_log.records))
    finally:
        wd.shutdown()
    failed_lines = [r for r in watchdog_log.records if "after_tick failed" in r.getMessage()
                    and r.levelno >= logging.ERROR]
    assert len(failed_lines) == 1 and failed_lines[0].exc_info, failed_lines


def test_decode_rejects_malformed_statuses_with_a_reason():
    good = RankStatus(1, 42, "h", 10.0, 3, 2)
    assert RankStatus.decode(good.encode()) == good
    assert RankStatus.decode(b'{"rank": 1, "pid": 42, "host": "h", "t": 10.0, "entered": 3, '
                             b'"finished": 2, "future": true}') == good  # newer fields ignored
    bad = [b"", b"\xff\xfe\x00", b"[1, 2]", b'{"rank": 1}', b"[" * 100_000,
           b'{"rank": "1", "pid": 42, "host": "h", "t": 1, "entered": 0, "finished": 0}',
           b'{"rank": 1, "pid": 0, "host": "h", "t": 1, "entered": 0, "finished": 0}',
           b'{"rank": 1, "pid": 42, "host": "h", "t": "now", "entered": 0, "finished": 0}',
           b'{"rank": 1, "pid": 42, "host": "h", "t": NaN, "entered": 0, "finished": 0}',
           b'{"rank": 1, "pid": 42, "host": 7, "t": 1, "entered": 0, "finished": 0}',
           b'{"rank": 1, "pid": 42, "host": "h", "t": 1, "entered": true, "finished": 0}',
           b'{"rank": 1, "pid": 42, "host": "h", "t": 1, "entered": 0, "finished": 0, '
           b'"state": "zombie"}']
    for raw in bad:
        with pytest.raises(ValueError):
            RankStatus.decode(raw)


# ------------------------------------------------------------- warm-up deadlines
def test_warmup_deadline_is_finite_and_ends_at_end_warmup_or_after_warmup_calls(store):
    assert WatchdogSettings(deadline_s=5.0, warmup_deadline_s=0.0).warmup_limit_s == \
        max(rank_watchdog.WARMUP_FALLBACK_FLOOR_S, 50.0)
    assert WatchdogSettings(deadline_s=30.0, warmup_deadline_s=0.0).warmup_limit_s == 300.0
    assert WatchdogSettings(warmup_deadline_s=7.0, warmup_fallback_s=9.0).warmup_limit_s == 7.0
    wd = _watchdog(store, 0, 1, deadline_s=0.3, warmup_calls=3, warmup_fallback_s=9.0)
    try:
        assert [wd.deadline_for(s) for s in (1, 3, 4)] == [9.0, 9.0, 0.3]  # after warmup_calls
        wd.end(wd.begin("dispatch"))
        assert wd.warming_up
        wd.end_warmup()
        assert not wd.warming_up
        assert [wd.deadline_for(s) for s in (1, 2)] == [9.0, 0.3]  # call 1 was warm-up
        wd.end_warmup()  # idempotent
        assert wd.deadline_for(2) == 0.3
    finally:
        wd.shutdown()


class _GlooPair:
    """Two ranks' gloo groups in this process; rank 1 never enters a collective (a peer
    stuck in its compute, its watchdog still beating) until :meth:`release`."""

    def __init__(self, store, prefix: str):
        self.pgs: list = [None, None]
        threads = [threading.Thread(target=self._make, args=(store, prefix, r)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert all(self.pgs), "gloo rendezvous failed"
        self.pending = 0

    def _make(self, store, prefix: str, rank: int) -> None:
        self.pgs[rank] = dist.ProcessGroupGloo(dist.PrefixStore(prefix, _client(store)), rank, 2,
                                               timedelta(seconds=120))

    def release(self) -> None:
        """Rank 1 joins every collective rank 0 left waiting (a clean teardown of both)."""
        for _ in range(self.pending):
            self.pgs[1].allreduce([torch.zeros(4)]).wait(timedelta(seconds=30))


def _timed_hung_call(store, watchdog: RankWatchdog, pair: _GlooPair) -> float:
    pair.pending += 1
    started = time.monotonic()
    with pytest.raises(RankFaultError):
        guarded_all_reduce(watchdog, GlooTransport.over(pair.pgs[0]), torch.zeros(4))
    return time.monotonic() - started


def test_a_serving_call_after_end_warmup_is_cut_at_the_steady_deadline(store):
    deadline_s = 0.3
    pair = _GlooPair(store, "serving")
    sink = LogAndCountSink()
    # Without end_warmup() this call would be warm-up, with a 30 s deadline.
    wd = _watchdog(store, 0, 2, sink, deadline_s=deadline_s, warmup_calls=200,
                   warmup_fallback_s=30.0)
    peer = _watchdog(store, 1, 2, warmup_calls=200, warmup_fallback_s=30.0)
    try:
        wd.end_warmup()
        took = _timed_hung_call(store, wd, pair)
        assert deadline_s * 0.9 <= took < 3.0, took
        report = _wait_for("the late peer named", lambda: _reports_on(sink, 1))[0]
        assert report.kind is FaultKind.SLOW and report.seq == 1, report
    finally:
        pair.release()
        peer.shutdown()
        wd.shutdown()


def test_a_warmup_call_is_not_cut_at_the_deadline_but_by_the_finite_fallback(store):
    deadline_s, fallback_s = 0.3, 1.5
    pair = _GlooPair(store, "warmup")
    sink = LogAndCountSink()
    # warmup_deadline_s 0 ("no deadline") still gets the finite fallback.
    wd = _watchdog(store, 0, 2, sink, deadline_s=deadline_s, warmup_calls=200,
                   warmup_deadline_s=0.0, warmup_fallback_s=fallback_s)
    peer = _watchdog(store, 1, 2, warmup_calls=200, warmup_fallback_s=fallback_s)
    try:
        assert wd.warming_up
        took = _timed_hung_call(store, wd, pair)
        assert fallback_s * 0.9 <= took < fallback_s + 3.0, took
        report = _wait_for("the late peer named", lambda: _reports_on(sink, 1))[0]
        assert report.kind is FaultKind.SLOW and report.seq == 1, report
    finally:
        pair.release()
        peer.shutdown()
        wd.shutdown()


def test_a_peer_whose_clock_is_far_behind_is_not_stale_while_it_beats(store):
    """Issue 13: across hosts the clocks differ. A peer 30 s behind (> heartbeat_stale_s) that
    keeps beating is never named; once it stops, it is named within stale_s + a few ticks,
    timed on the watcher's own clock."""
    stale_s = 0.6
    sink = LogAndCountSink()
    stop = threading.Event()
    skew_s = -30.0

    def beat():
        client = _client(store)
        while not stop.is_set():
            client.set(keys.heartbeat(GROUP, 0, 1),
                       RankStatus(1, 4242, "elsewhere", time.time() + skew_s, 0, 0).encode())
            time.sleep(INTERVAL_S)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    wd = _watchdog(store, 0, 2, sink, heartbeat_stale_s=stale_s)
    try:
        time.sleep(5 * stale_s)
        assert not _reports_on(sink, 1), "a beating peer was named for its clock"
        stop.set()
        beater.join(timeout=5)
        stopped = time.time()
        report = _wait_for("rank 1 named", lambda: _reports_on(sink, 1))[0]
        assert report.kind is FaultKind.HUNG, report
        assert report.detected_at - stopped < stale_s + 1.0, report.detected_at - stopped
    finally:
        wd.shutdown()


class _StallingStore:
    """A watcher's store client whose next ``set`` waits ``stall_s`` (a store, or a watcher,
    that stalls: the watcher's reads wait with it)."""

    def __init__(self, inner):
        self.inner = inner
        self.stall_s = 0.0

    def set(self, key, value):
        stall, self.stall_s = self.stall_s, 0.0
        time.sleep(stall)
        return self.inner.set(key, value)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("discounted", [True, False])
def test_a_stall_of_the_watcher_or_store_is_no_peers_silence(store, monkeypatch, discounted):
    """The store stalls 1.5 s (> stale_s): the watcher's beat and reads wait, and so does the
    peer's beat, which is answered after the watcher's read. The first read after the gap
    finds the peer's value of before it. Without the discount (``discounted=False``, the
    old rule) that named a live peer hung — the test would pass only with the rule in."""
    if not discounted:
        monkeypatch.setattr(RankWatchdog, "_discount_own_gap", lambda self, now: None)
    stale_s = 0.6
    sink = LogAndCountSink()
    paused = threading.Event()
    stop = threading.Event()

    def beat():
        client = _client(store)
        n = 0
        while not stop.is_set():
            if not paused.is_set():
                n += 1
                client.set(keys.heartbeat(GROUP, 0, 1),
                           RankStatus(1, 4242, "elsewhere", time.time(), n, n).encode())
            time.sleep(INTERVAL_S)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    stalling = _StallingStore(_client(store))
    wd = RankWatchdog(WatchdogSettings(deadline_s=1.0, warmup_calls=0,
                                       heartbeat_interval_s=INTERVAL_S,
                                       heartbeat_stale_s=stale_s),
                      stalling, GROUP, 0, 2, sink=sink)
    try:
        time.sleep(4 * INTERVAL_S)
        paused.set()
        stalling.stall_s = 1.5  # the next beat of the watcher waits; its reads after it
        time.sleep(1.5 + 2 * INTERVAL_S)  # the watcher's first read after the gap is done
        time.sleep(2 * INTERVAL_S)  # ... and its second, before the peer's queued beat
        paused.clear()
        time.sleep(6 * INTERVAL_S)
        named = _reports_on(sink, 1)
        if discounted:
            assert not named, named
        else:
            assert named and named[0].kind is FaultKind.HUNG, "the test did not stall"
    finally:
        stop.set()
        beater.join(timeout=5)
        wd.shutdown()
