"""Moving a DP group to its next epoch: fence, agree on members, place experts.

The one procedure every process of a group runs when it learns of a fault —
a vLLM worker (its collective failed), an engine core (its DP sync failed) or
the test harness — so that whoever gets there first, all of them end up with
the same members and the same expert placement for the same epoch:

1. ``fence``: the epoch moves past the one in which the fault happened
   (one compare-and-set; late callers learn the value);
2. ``agree``: each survivor registers; the first one publishes the members
   (the expected survivors that registered within the join window) and the
   placement (:func:`placement.solver.solve` over the previous placement).

Membership and placement are published under ``eft/<g>/e<epoch>/members``; a
process that was not there (idle, or stalled) reads them with
:func:`published`.
"""

from __future__ import annotations

import json

from vllm_elastic_ft.group import membership as ms
from vllm_elastic_ft.group.fencing import current_epoch, fence
from vllm_elastic_ft.placement.solver import contiguous, solve


def num_experts_key(group: str) -> str:
    return f"eft/{group}/num_experts"


def initial(world: int, num_experts: int) -> ms.Membership:
    """Epoch 0: every rank, vLLM's contiguous ("linear") expert layout."""
    ranks = list(range(world))
    return ms.Membership(0, tuple(ranks), contiguous(num_experts, ranks), -1)


def published(store, group: str, epoch: int) -> ms.Membership | None:
    """The membership agreed for ``epoch``, or None while it is not published."""
    key = f"eft/{group}/e{epoch}/members"
    if not store.check([key]):
        return None
    data = json.loads(store.get(key))
    return ms.Membership(epoch, tuple(data["members"]),
                         {int(r): tuple(e) for r, e in data["placement"].items()}, data["leader"])


def advance(store, group: str, old: ms.Membership, me: int, suspects: set[int],
            num_experts: int, window_s: float, timeout_s: float) -> ms.Membership:
    """Take the group from ``old`` to the next agreed membership; ``me`` registers in it.

    Raises:
        FencedError: ``me`` is not a member (it arrived after the members were published).
        TimeoutError: nobody published the membership within ``timeout_s``.
    """
    epoch = fence(store, group, old.epoch)
    # A peer may already have moved several epochs on: then the old placement
    # is the latest one published before ``epoch``.
    base = old
    for e in range(epoch - 1, old.epoch, -1):
        base = published(store, group, e) or base
        if base.epoch == e:
            break
    expected = [r for r in base.members if r not in suspects]
    return ms.agree(store, group, epoch, me, expected, window_s,
                    lambda members: solve(num_experts, base.placement, members).placement,
                    timeout_s=timeout_s)


def latest_epoch(store, group: str) -> int:
    return current_epoch(store, group)
