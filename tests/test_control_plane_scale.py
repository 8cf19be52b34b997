"""The control plane at width: the benchmark's contract, and the watchdog's batched peer reads.

* ``benchmarks/control_plane_scale.py`` on 5 real rank processes, one SIGKILLed:
  its JSON row has the fields the issue asks for and a detection;
* the watchdog's peer reads (``WatchdogSettings.peer_reads``): ``batched`` costs
  O(1) store requests per tick once every rank beats (``per_peer``, the design
  before, costs one ``check`` per peer), reads the same statuses, still names a
  dead and a hung peer, picks up a rank that starts beating late, survives a key
  that goes away, and starts over at a new epoch;
* ``RankWatchdog(host=...)``: a peer that publishes another host is judged by
  staleness, never probed in this host's ``/proc``.

Real watchdogs on a real TCPStore (127.0.0.1, port 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.testing.control_plane import CountingStore, counter_slots, totals
from vllm_elastic_ft.watchdog.attribution import RankStatus, this_host
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings
from vllm_elastic_ft.watchdog.report import FaultKind, LogAndCountSink

ROOT = Path(__file__).resolve().parents[1]
GROUP = "scale"
WORLD = 16
#: The watcher's own ticks are rare; the test drives ticks by hand, under the watchdog's lock
#: (the watcher's tick takes the same lock, so it never lands inside a measured one).
QUIET_INTERVAL_S = 1.0


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def _client(store) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _beat(store, rank: int, *, epoch: int = 0, host: str = "elsewhere", t: float | None = None,
          pid: int = 4242) -> None:
    """A peer's heartbeat (on another host by default: never probed, fresh unless ``t``)."""
    status = RankStatus(rank, pid, host, time.time() if t is None else t, 0, 0)
    store.set(keys.heartbeat(GROUP, epoch, rank), status.encode())


class _Counted:
    """A watchdog on a counting client whose ticks the test drives."""

    def __init__(self, store, peer_reads: str, world: int = WORLD, **over):
        self.counts = [0] * counter_slots(1)
        self.client = CountingStore(_client(store), self.counts, 0, GROUP)
        self.sink = LogAndCountSink()
        settings = WatchdogSettings(**{**dict(heartbeat_interval_s=QUIET_INTERVAL_S,
                                              heartbeat_stale_s=60.0, peer_reads=peer_reads),
                                       **over})
        self.wd = RankWatchdog(settings, self.client, GROUP, 0, world, sink=self.sink)
        deadline = time.monotonic() + 10
        while not self.client.heartbeats:  # the start-up tick went through
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def tick(self) -> dict[str, int]:
        """One tick; the store requests it made, by method."""
        with self.wd._lock:
            before = totals(self.counts, [0])
            self.wd._tick_locked()
            after = totals(self.counts, [0])
        return {k: after[k] - before[k] for k in after}

    def statuses(self) -> dict[int, RankStatus]:
        with self.wd._lock:
            return self.wd._read_statuses()

    def close(self) -> None:
        self.wd.shutdown(clean=False)


@pytest.fixture
def counted(store):
    made = []

    def make(peer_reads: str, **over) -> _Counted:
        made.append(_Counted(store, peer_reads, **over))
        return made[-1]
    yield make
    for c in made:
        c.close()


# ------------------------------------------------------------------ the benchmark
def test_benchmark_row_on_five_real_ranks_one_killed(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "control_plane_scale.py"), "--ranks", "5",
         "--kills", "1", "--window-s", "2", "--settle-s", "1", "--post-s", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 1, rows
    row = rows[0]
    for field in ("ranks", "detect_p50_s", "detect_p99_s", "agree_s", "ready_s",
                  "store_ops_per_s", "store_cpu", "rank_processes"):
        assert field in row, (field, row)
    assert row["ranks"] == 5 and row["rank_processes"] == "real" and row["processes"] == 5
    assert row["peer_reads"] == "batched" and row["killed"] == 1
    assert row["recovered"] and row["members_ok"] and row["final_epoch"] == 1, row
    assert row["detected_by"] == row["survivors"] == 4, row
    # Every rank is on one virtual host: the victim's process is probed, named dead.
    assert row["named_kinds"].get("dead", 0) >= 1 and "hung" not in row["named_kinds"], row
    assert 0 < row["detect_p50_s"] <= row["detect_p99_s"] < 2.0, row
    assert 0 < row["agree_s"] < 5.0 and 0 <= row["ready_s"] < 5.0, row
    assert row["store_ops_per_s"] > 0 and row["false_verdicts"] == 0, row


# ------------------------------------------------------------------ batched peer reads
@pytest.mark.parametrize("peer_reads,most_requests", [("batched", 5), ("per_peer", WORLD + 4)])
def test_a_tick_costs_o1_store_requests_batched_and_one_per_peer_before(store, counted,
                                                                       peer_reads, most_requests):
    for r in range(1, WORLD):
        _beat(store, r)
    c = counted(peer_reads)
    c.tick()  # learns which keys exist
    spent = c.tick()
    reads = spent["check_requests"] + spent["get_requests"] + spent["multi_get_requests"]
    assert spent["requests"] <= most_requests, spent
    if peer_reads == "batched":
        assert reads <= 3, spent  # epoch check, one check of every key, one multi_get
    else:
        assert spent["check_requests"] >= WORLD, spent
    assert spent["multi_get_requests"] == 1 and spent["set_requests"] == 1, spent
    assert set(c.statuses()) == set(range(WORLD))


def test_batched_and_per_peer_read_the_same_statuses(store, counted):
    for r in (1, 2, 5, 9):  # some ranks have not started
        _beat(store, r)
    batched, per_peer = counted("batched"), counted("per_peer")
    for c in (batched, per_peer):
        c.tick()
    a, b = batched.statuses(), per_peer.statuses()
    assert set(a) == set(b) == {0, 1, 2, 5, 9}
    assert {r: (s.pid, s.host) for r, s in a.items() if r} == \
        {r: (s.pid, s.host) for r, s in b.items() if r}


def test_a_rank_that_starts_beating_late_is_read_and_then_batched(store, counted):
    for r in range(1, WORLD - 1):
        _beat(store, r)
    c = counted("batched")
    c.tick()
    assert WORLD - 1 not in c.statuses()
    _beat(store, WORLD - 1)
    c.tick()
    assert set(c.statuses()) == set(range(WORLD))
    spent = c.tick()
    assert spent["check_requests"] <= 2, spent  # the late rank is in the batch now


def test_batched_reads_still_name_a_dead_and_a_hung_peer(store, counted):
    for r in range(2, WORLD):
        _beat(store, r)
    c = counted("batched", heartbeat_stale_s=0.5)
    c.tick()
    time.sleep(0.7)
    for r in range(3, WORLD):  # every peer beats again but rank 2 (another host): silent
        _beat(store, r)
    c.tick()
    hung = [x for x in c.sink.reports if 2 in x.suspects]
    assert hung and hung[0].kind is FaultKind.HUNG and hung[0].suspects == (2,), c.sink.reports
    _beat(store, 1, host=this_host(), pid=_dead_pid())  # this host, process gone
    for r in range(3, WORLD):
        _beat(store, r)
    c.tick()  # (dead outranks hung: this verdict names rank 1 alone)
    dead = [x for x in c.sink.reports if 1 in x.suspects]
    assert dead and dead[0].kind is FaultKind.DEAD and dead[0].suspects == (1,), c.sink.reports
    assert not [x for x in c.sink.reports if set(x.suspects) - {1, 2}], c.sink.reports


def test_a_key_that_goes_away_is_checked_one_by_one_again(store, counted):
    for r in range(1, WORLD):
        _beat(store, r)
    c = counted("batched")
    c.tick()
    store.delete_key(keys.heartbeat(GROUP, 0, 7))
    started = time.monotonic()
    c.tick()  # the batch comes back false: no multi_get of a missing key (it would block)
    assert time.monotonic() - started < 2.0
    assert set(c.statuses()) == set(range(WORLD)) - {7}


def test_a_new_epoch_starts_from_no_known_keys(store, counted):
    for r in range(1, WORLD):
        _beat(store, r)
    c = counted("batched")
    c.tick()
    store.set(keys.epoch(GROUP), "1")
    c.wd.reconfigure(1, 0, 4)
    _beat(store, 1, epoch=1)
    c.tick()
    assert set(c.statuses()) == {0, 1}  # epoch 1's keys only, ranks 2, 3 not beating yet


# ------------------------------------------------------------------ virtual hosts
def test_a_peer_on_another_host_is_judged_by_staleness_not_probed(store):
    gone = _dead_pid()
    _beat(store, 1, host=f"{this_host()}/vhost1", pid=gone)  # a pid that is gone HERE
    sink = LogAndCountSink()
    wd = RankWatchdog(WatchdogSettings(heartbeat_interval_s=0.05, heartbeat_stale_s=0.5),
                      _client(store), GROUP, 0, 2, sink=sink, host=f"{this_host()}/vhost0")
    try:
        time.sleep(0.3)
        assert not sink.reports, sink.reports  # not probed: fresh, so healthy
        deadline = time.monotonic() + 5
        while not sink.reports:
            assert time.monotonic() < deadline, "the silent peer was never named"
            time.sleep(0.02)
        # its value never changes: silent for heartbeat_stale_s, hung (not dead: not probed)
        assert sink.reports[0].kind is FaultKind.HUNG and sink.reports[0].suspects == (1,)
        status = RankStatus.decode(store.get(keys.heartbeat(GROUP, 0, 0)))
        assert status.host == f"{this_host()}/vhost0"
    finally:
        wd.shutdown(clean=False)
