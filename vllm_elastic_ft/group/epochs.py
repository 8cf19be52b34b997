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

Membership and placement are published per epoch (``keys.members``); a
process that was not there (idle, or stalled) reads them with
:func:`published`.
"""

from __future__ import annotations

import json
import time
from typing import Callable

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group import membership as ms
from vllm_elastic_ft.group.fencing import fence
from vllm_elastic_ft.placement.solver import contiguous, solve


def initial(world: int, num_experts: int) -> ms.Membership:
    """Epoch 0: every rank, vLLM's contiguous ("linear") expert layout."""
    ranks = list(range(world))
    return ms.Membership(0, tuple(ranks), contiguous(num_experts, ranks), -1)


def published(store, group: str, epoch: int) -> ms.Membership | None:
    """The membership agreed for ``epoch``, or None while it is not published."""
    key = keys.members(group, epoch)
    if not store.check([key]):
        return None
    data = json.loads(store.get(key))
    return ms.Membership(epoch, tuple(data["members"]),
                         {int(r): tuple(e) for r, e in data["placement"].items()}, data["leader"])


def await_published(store, group: str, epoch: int, timeout_s: float) -> ms.Membership:
    """The membership agreed for ``epoch``, waiting for it (a follower that does not register,
    e.g. an engine core adopting its workers' agreement).

    Raises:
        TimeoutError: nothing was published within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while (membership := published(store, group, epoch)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group}: epoch {epoch} never got its members")
        time.sleep(0.01)
    return membership


def reported_suspects(reports: Callable[[], list], old: ms.Membership,
                      moved_on: Callable[[], bool], wait_s: float) -> set[int]:
    """Stable ids of the ranks named by this rank's FaultReports at ``old.epoch``.

    Reports name group ranks (indexes into ``old.members``). Waits up to
    ``wait_s`` for a report to arrive, unless the group already moved on (then
    the epoch's leader decides who is in; lagging behind helps nobody).
    """
    deadline = time.monotonic() + wait_s
    while True:
        found = [r for r in reports() if r.epoch == old.epoch]
        if found or moved_on() or time.monotonic() >= deadline:
            return {old.members[s] for r in found for s in r.suspects if s < len(old.members)}
        time.sleep(0.01)


def advance(store, group: str, old: ms.Membership, me: int, suspects: set[int],
            num_experts: int, window_s: float, timeout_s: float,
            silent: Callable[[], set[int]] | None = None) -> ms.Membership:
    """Take the group from ``old`` to the next agreed membership; ``me`` registers in it.

    ``silent``: the members of ``old`` this rank's watchdog finds dead or silent now
    (stable ids; see :func:`membership.agree`).

    (A replacement rank comes in through :func:`admit`, a planned fence.)

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
                    timeout_s=timeout_s, eligible=list(base.members), suspects=suspects,
                    silent=silent)


def is_admission(store, group: str, epoch: int) -> bool:
    """Whether ``epoch`` is an admission's planned fence (marked before the fence), not a fault's."""
    return store.check([keys.admission(group, epoch)])


def admit(store, group: str, old: ms.Membership | None, me: int, joiner: int, ticket: str,
          joiner_experts: tuple[int, ...] | None, step: int, window_s: float,
          timeout_s: float) -> ms.Membership:
    """Take the group to the next epoch with ``joiner`` added back (a planned fence).

    Every member and the joiner call this at the same time (the front end asks
    them while the group is paused). Members pass their current membership
    ``old``; the joiner passes ``old=None`` and the experts it loaded. The
    members fence and publish the new epoch under ``ticket``; the joiner
    registers at that epoch; the leader (whoever arrives first) places the
    joiner's experts back on it. Members also publish their ``step`` number
    (``keys.admission_step``), which the joiner adopts.

    Raises:
        FencedError: ``me`` did not make it into the new epoch.
        TimeoutError: the admission did not happen within ``timeout_s``.
    """
    from vllm_elastic_ft.placement.solver import admit as admit_placement

    if old is not None:
        # The mark goes first: a member that sees the new epoch before its own
        # admit call arrives must know the fence is this admission's, not a fault's.
        store.set(keys.admission(group, old.epoch + 1), ticket)
        epoch = fence(store, group, old.epoch)
        store.set(keys.admission_step(group, epoch, me), str(step))
        store.set(keys.admit_epoch(group, ticket), str(epoch))
    else:
        store.set(keys.admit_experts(group, ticket), json.dumps(list(joiner_experts or ())))
        deadline = time.monotonic() + timeout_s
        while not store.check([keys.admit_epoch(group, ticket)]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"group {group}: nobody admitted rank {me} (ticket {ticket})")
            time.sleep(0.005)
        epoch = int(store.get(keys.admit_epoch(group, ticket)))
    base = published(store, group, epoch - 1) if epoch > 1 else None
    if base is None:
        if old is None:
            raise TimeoutError(f"group {group}: no membership before epoch {epoch} to join")
        base = old
    expected = sorted(set(base.members) | {joiner})

    def place(members: list[int]) -> dict[int, tuple[int, ...]]:
        # The joiner wrote its experts before it registered; if it did not
        # register in time, the placement stays as it was.
        brought = tuple(json.loads(store.get(keys.admit_experts(group, ticket)))) \
            if joiner in members else ()
        return admit_placement(base.placement, members, joiner, brought)

    # The joiner is not a member of the base epoch: it never leads its own admission.
    return ms.agree(store, group, epoch, me, expected, window_s, place, timeout_s=timeout_s,
                    eligible=list(base.members))
