"""The membership agreement survives its leader (issue 13): leader terms with a lease, one
publication per epoch, and only base members may lead. Real TCPStore, ranks as threads."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group import membership as ms
from vllm_elastic_ft.group.fencing import FencedError

GROUP = "dp"


@pytest.fixture()
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=30))


def _place(members):
    return {r: (i,) for i, r in enumerate(members)}


def _agree_all(store, ranks, epoch=1, expected=(0, 1, 2), eligible=(0, 1, 2), window_s=0.4,
               lease_s=0.3, place=_place, timeout_s=10.0):
    """Every rank of ``ranks`` agrees at once (threads); returns rank -> Membership or error."""
    results = {}

    def run(rank):
        try:
            results[rank] = ms.agree(store, GROUP, epoch, rank, list(expected), window_s,
                                     place, timeout_s=timeout_s, eligible=list(eligible),
                                     lease_s=lease_s)
        except Exception as err:  # noqa: BLE001 - the test reads it
            results[rank] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 5)
    return results


def test_a_leader_that_died_after_claiming_is_replaced_and_left_out(store):
    # Rank 0 registered and claimed term 0, then died before publishing.
    store.set(keys.registered(GROUP, 1, 0), "1")
    store.compare_set(keys.leader_term(GROUP, 1, 0), "", "0")
    started = time.monotonic()
    results = _agree_all(store, [1, 2])
    took = time.monotonic() - started
    for rank in (1, 2):
        assert isinstance(results[rank], ms.Membership), results[rank]
        assert results[rank].members == (1, 2), "the failed leader is left out"
        assert results[rank].leader in (1, 2)
    assert results[1] == results[2], "one publication"
    # window + lease to take over, then the new leader does not wait for the dead one.
    assert took < 0.4 + 0.3 + 0.4 + 1.0, took


def test_without_the_lease_rule_a_dead_leader_would_hold_everyone_to_the_timeout(store):
    """The same dead leader with a lease longer than the whole agreement: nobody takes over,
    and the agreement ends in TimeoutError within its bound (never a hang)."""
    store.set(keys.registered(GROUP, 1, 0), "1")
    store.compare_set(keys.leader_term(GROUP, 1, 0), "", "0")
    results = _agree_all(store, [1, 2], lease_s=60.0, timeout_s=1.5)
    assert all(isinstance(results[r], TimeoutError) for r in (1, 2)), results


def test_a_slow_leader_and_its_successor_publish_one_membership(store):
    """Rank 0 leads but takes longer than its lease to publish (its placement is slow): rank 1
    takes over and publishes without it; rank 0's late publication loses, and it learns it
    is out (FencedError: it may rejoin as a replacement)."""
    def place(members):
        if 0 in members:
            time.sleep(1.5)
        return _place(members)

    store.set(keys.registered(GROUP, 1, 0), "1")
    first = threading.Thread(target=lambda: results.update(_agree_all(
        store, [0], expected=(0, 1), eligible=(0, 1), place=place)))
    results: dict = {}
    first.start()
    time.sleep(0.1)  # rank 0 claims term 0
    results.update(_agree_all(store, [1], expected=(0, 1), eligible=(0, 1), place=place))
    first.join(timeout=15)
    assert isinstance(results[1], ms.Membership) and results[1].members == (1,), results
    assert isinstance(results[0], FencedError), results[0]
    published = json.loads(store.get(keys.members(GROUP, 1)))
    assert published["members"] == [1] and published["leader"] == 1


def test_a_rank_outside_the_base_epoch_never_leads_or_admits_itself(store):
    """A joiner (or stale rank) that arrives first must not claim leadership: the base member
    who arrives later leads. Alone, the outsider publishes nothing."""
    results = _agree_all(store, [7], expected=(0, 1), eligible=(0, 1), timeout_s=0.8)
    assert isinstance(results[7], TimeoutError), results[7]
    assert not store.check([keys.leader_term(GROUP, 1, 0)]), "the outsider claimed a term"
    assert not store.check([keys.members(GROUP, 1)])
    # With the base members there, the outsider is in only if they expect it (an admission).
    results = _agree_all(store, [7, 0, 1], epoch=2, expected=(0, 1, 7), eligible=(0, 1))
    assert all(isinstance(results[r], ms.Membership) for r in (0, 1, 7)), results
    assert results[0].members == (0, 1, 7) and results[0].leader in (0, 1)
    results = _agree_all(store, [7, 0, 1], epoch=3, expected=(0, 1), eligible=(0, 1))
    assert isinstance(results[7], FencedError), "not expected: it cannot put itself in"
    assert results[0].members == (0, 1)


def test_the_agreement_is_unchanged_when_nothing_fails(store):
    started = time.monotonic()
    results = _agree_all(store, [0, 1, 2])
    assert {results[r].members for r in (0, 1, 2)} == {(0, 1, 2)}
    assert time.monotonic() - started < 0.4, "no one waited out a window or a lease"


def lead_then_follow(store, leader, follower, window_s, silent=None):
    """Agreement at epoch 1 of two survivors, each ``(rank, expected, suspects)``: the
    leader claims the lead first (it alone gets ``silent``), then the follower registers.
    Returns rank -> Membership and the seconds it took."""
    results = {}

    def run(rank, expected, suspects, silent=None):
        results[rank] = ms.agree(store, GROUP, 1, rank, expected, window_s, _place,
                                 timeout_s=10.0, eligible=[0, 1, 2, 3], suspects=suspects,
                                 silent=silent)

    first = threading.Thread(target=run, args=(*leader, silent))
    second = threading.Thread(target=run, args=follower)
    started = time.monotonic()
    first.start()
    time.sleep(0.05)  # the leader claims the lead first
    second.start()
    first.join(timeout=15)
    second.join(timeout=15)
    return results, time.monotonic() - started


def test_a_leader_does_not_wait_for_a_rank_another_member_named(store):
    """A node of two ranks (2, 3) is cut off: rank 0's report named only rank 3 (rank 2's
    heartbeat was a tick younger), rank 1's named both. Rank 0 leads, expecting rank 2 —
    rank 1's registration says it is gone, so the leader publishes [0, 1] at once instead
    of waiting out its window for rank 2 (the partition took 5.1 s, 3 of them this wait)."""
    window_s = 3.0
    results, took = lead_then_follow(store, (0, [0, 1, 2], [3]), (1, [0, 1], [2, 3]), window_s)
    assert results[0].members == results[1].members == (0, 1) and results[0].leader == 0
    assert took < window_s / 3, f"the leader waited {took:.2f}s for a rank named gone"


def test_a_rank_named_by_a_peer_that_registers_anyway_is_a_member(store):
    """Not waiting for a named rank is not leaving it out: one that registers in time is in."""
    results = _agree_all(store, [0, 1, 2], expected=(0, 1, 2))
    assert results[0].members == (0, 1, 2)
    store2_results = {}

    def run(rank, suspects):
        store2_results[rank] = ms.agree(store, GROUP, 2, rank, [0, 1, 2], 1.0, _place,
                                        timeout_s=10.0, eligible=[0, 1, 2], suspects=suspects)

    threads = [threading.Thread(target=run, args=(r, [2] if r == 1 else []))
               for r in (2, 0, 1)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=15)
    assert {m.members for m in store2_results.values()} == {(0, 1, 2)}
