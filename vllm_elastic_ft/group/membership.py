"""Who is in the group at a new epoch: a small agreement protocol over the store.

After a fence, every rank that should continue registers at the new epoch.
The first to arrive (``store.add`` orders arrivals) is the leader for that
epoch: it waits until the ranks it expects have registered, or
``window_s`` has passed, then publishes the member list and the expert
placement. Everyone else waits for that publication. A rank that is not in
the list (it arrived late: it was stopped, or it is stale) is fenced out and
may ask to join the next epoch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group.fencing import FencedError


@dataclass(frozen=True)
class Membership:
    epoch: int
    members: tuple[int, ...]  # stable rank ids, sorted; group rank = index
    placement: dict[int, tuple[int, ...]]
    leader: int

    def group_rank(self, rank_id: int) -> int:
        return self.members.index(rank_id)


def request_join(store, group: str, rank_id: int) -> None:
    """A replacement (or fenced-out) rank asks to join at the next epoch."""
    store.set(keys.join_request(group), str(rank_id))


_NO_REQUEST = "none"


def pending_join(store, group: str) -> int | None:
    """The rank that asked to join, or None.

    One atomic read: the epoch's leader deletes the request once it admitted
    the joiner, and a ``check`` followed by a ``get`` can straddle that delete
    (measured on torch 2.13's TCPStore: the ``get`` then returns b"" or waits
    for the store timeout, holding the client's lock). ``compare_set`` with
    the same sentinel as expected and desired value returns the current value
    of an existing key and never creates a missing one.
    """
    value = store.compare_set(keys.join_request(group), _NO_REQUEST, _NO_REQUEST).decode()
    return None if value == _NO_REQUEST else int(value)


def agree(store, group: str, epoch: int, me: int, expected: list[int], window_s: float,
          place, timeout_s: float = 30.0) -> Membership:
    """Register ``me`` at ``epoch`` and return the agreed membership.

    Args:
        expected: the ranks this rank believes will continue (the leader stops
            waiting once they all registered).
        window_s: how long the leader waits for stragglers.
        place: ``place(members) -> placement`` (the leader computes it).
        timeout_s: how long a follower waits for the leader.

    Raises:
        FencedError: ``me`` is not a member of ``epoch``.
        TimeoutError: no leader published in time.
    """
    store.set(keys.registered(group, epoch, me), "1")
    arrival = store.add(keys.arrivals(group, epoch), 1)
    published = keys.members(group, epoch)
    if arrival == 1:
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            if all(store.check([keys.registered(group, epoch, r)]) for r in expected):
                break
            time.sleep(0.005)
        candidates = set(expected) | {me}
        members = sorted(r for r in candidates if store.check([keys.registered(group, epoch, r)]))
        placement = place(members)
        store.set(published, json.dumps({"members": members, "leader": me,
                                         "placement": {str(r): list(e) for r, e in placement.items()}}))
    deadline = time.monotonic() + timeout_s
    while not store.check([published]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group}: no membership published for epoch {epoch}")
        time.sleep(0.005)
    data = json.loads(store.get(published))
    membership = Membership(epoch, tuple(data["members"]),
                            {int(r): tuple(e) for r, e in data["placement"].items()}, data["leader"])
    if me not in membership.members:
        raise FencedError(group, me, epoch - 1, epoch)
    return membership
