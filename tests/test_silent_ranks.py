"""A cut-off node's ranks that nobody's report named do not hold up the agreement (issue 13).

When a node's link goes down, the first report names the rank whose heartbeat went stale
first; its node-mate's goes stale a tick later, once every survivor is already fenced and
reports no more. Before, the leader then waited out its whole join window (3 s of the
two-node partition drill's 4.9 s) for that rank. Now the leader asks its own watchdog which
ranks are silent while it waits, and survivors keep beating while fenced, so a survivor on
its way to register never looks silent. Real TCPStore and real watchdogs; ranks as threads.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from test_membership_leader import lead_then_follow

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group.fencing import fence
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings

GROUP = "dp"
WINDOW_S = 3.0
STALE_S = 0.6
INTERVAL_S = 0.05


@pytest.fixture()
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=30))


def _client(store) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=30))


def test_the_leader_stops_waiting_for_a_rank_that_falls_silent_during_the_window(store):
    """Both survivors named rank 3 only; rank 2 falls silent 0.3 s into the window."""
    named_at = time.monotonic() + 0.3
    results, took = lead_then_follow(
        store, (0, [0, 1, 2], [3]), (1, [0, 1, 2], [3]), WINDOW_S,
        silent=lambda: {2, 3} if time.monotonic() >= named_at else {3})
    assert results[0].members == results[1].members == (0, 1) and results[0].leader == 0
    assert took < WINDOW_S / 3, f"the leader waited {took:.2f}s for a silent rank"


def test_without_the_silent_check_the_leader_waits_out_its_window(store):
    """The same agreement with nothing telling the leader: the whole window (what the check
    saves, and proof that the test above measures it)."""
    results, took = lead_then_follow(store, (0, [0, 1, 2], [3]), (1, [0, 1, 2], [3]), WINDOW_S)
    assert results[0].members == (0, 1)
    assert took >= WINDOW_S * 0.9


def test_a_failing_silent_check_leaves_the_agreement_as_it_was(store):
    def broken():
        raise ConnectionError("store gone")

    results, _ = lead_then_follow(store, (0, [0, 1], []), (1, [0, 1], []), WINDOW_S,
                                  silent=broken)
    assert results[0].members == results[1].members == (0, 1)


def _watchdog(store, rank: int, world: int) -> RankWatchdog:
    return RankWatchdog(WatchdogSettings(deadline_s=1.0, warmup_calls=0,
                                         heartbeat_interval_s=INTERVAL_S,
                                         heartbeat_stale_s=STALE_S),
                        _client(store), GROUP, rank, world, host="elsewhere-%d" % rank)


def test_silent_peers_names_a_rank_that_stopped_beating_not_a_fenced_survivor(store):
    """Rank 2 stops beating (its node cut off); rank 1 is fenced (it saw a new epoch) but
    lives: only rank 2 is silent to rank 0, however long rank 1 takes to register."""
    dogs = {r: _watchdog(store, r, 3) for r in range(3)}
    try:
        deadline = time.monotonic() + 10
        while not all(store.check([keys.heartbeat(GROUP, 0, r)]) for r in range(3)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(3 * INTERVAL_S)
        assert dogs[0].silent_peers() == []
        dogs[2].shutdown(clean=False)  # stops beating, leaves no "left" mark
        fence(store, GROUP, 0)
        time.sleep(STALE_S + 4 * INTERVAL_S)
        assert dogs[1].group_epoch == 1, "rank 1 saw the fence"
        assert dogs[0].silent_peers() == [2]
        time.sleep(STALE_S)  # a survivor slow to register is still not silent
        assert dogs[0].silent_peers() == [2]
    finally:
        for dog in dogs.values():
            dog.shutdown()
