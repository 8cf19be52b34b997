"""Epoch fencing in a real TCPStore, and the expert placement solver."""

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist

from vllm_elastic_ft.group.fencing import current_epoch, fence
from vllm_elastic_ft.placement.solver import contiguous, solve


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def test_concurrent_fences_of_one_epoch_move_it_once(store):
    assert current_epoch(store, "g") == 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(fence(store, "g", 0)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [1] * 8 and current_epoch(store, "g") == 1
    assert fence(store, "g", 1) == 2
    assert fence(store, "g", 1) == 2, "a stale fencer learns the epoch, does not bump it"
    assert current_epoch(store, "other") == 0


def test_contiguous_matches_vllm_default_layout():
    assert contiguous(8, [0, 1, 2, 3]) == {0: (0, 1), 1: (2, 3), 2: (4, 5), 3: (6, 7)}
    assert contiguous(8, [0, 1, 2]) == {0: (0, 1, 2), 1: (3, 4, 5), 2: (6, 7)}


def test_shrink_loads_only_the_orphaned_experts_on_the_least_loaded():
    plan = solve(8, contiguous(8, [0, 1, 2, 3]), [0, 1, 3])
    assert plan.to_load == {0: (4,), 1: (5,)}
    assert plan.placement == {0: (0, 1, 4), 1: (2, 3, 5), 3: (6, 7)}
    assert plan.to_drop == {}
    assert sorted(e for v in plan.placement.values() for e in v) == list(range(8))


def test_redundant_replicas_mean_nothing_to_load():
    current = {0: (0, 1, 4), 1: (2, 3, 5), 2: (4, 5), 3: (6, 7)}
    plan = solve(8, current, [0, 1, 3])
    assert plan.to_load == {} and plan.placement[0] == (0, 1, 4)


def test_rejoin_takes_a_share_from_the_most_loaded():
    shrunk = solve(8, contiguous(8, [0, 1, 2, 3]), [0, 1, 3]).placement
    plan = solve(8, shrunk, [0, 1, 2, 3])
    assert len(plan.placement[2]) == 2 and set(plan.to_load[2]) == set(plan.placement[2])
    assert sorted(e for v in plan.placement.values() for e in v) == list(range(8))
    assert sum(len(v) for v in plan.to_drop.values()) == 2


def test_every_expert_is_computed_by_exactly_one_rank():
    current = {0: (0, 1, 4), 1: (2, 3, 5), 2: (4, 5), 3: (6, 7)}
    plan = solve(8, current, [0, 1, 2, 3])
    maps = {r: plan.expert_map(r, 8) for r in plan.placement}
    for e in range(8):
        assert sum(maps[r][e] >= 0 for r in maps) == 1
    assert maps[2][4] == -1 and maps[0][4] == 2  # rank 0 owns the replica of expert 4


def test_no_live_rank_is_an_error():
    with pytest.raises(ValueError, match="no live rank"):
        solve(8, {}, [])
