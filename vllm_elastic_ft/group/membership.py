"""Who is in the group at a new epoch: a small agreement protocol over the store.

After a fence, every rank that should continue registers at the new epoch.
One of them leads: it waits until the ranks it expects have registered, or
``window_s`` has passed, then publishes the member list and the expert
placement. Everyone else waits for that publication. A rank that is not in
the list (it arrived late: it was stopped, or it is stale) is fenced out and
may ask to join the next epoch.

Leadership comes in terms, each claimed with one ``compare_set`` on the term's
key (the store orders the claims): the first eligible rank to arrive claims
term 0. A leader has ``window_s + lease_s`` from when a follower first saw its
claim to publish; past that, a follower claims the next term and leads in its
place, leaving every earlier term's leader out of the members (it failed its
lease: dead, or too slow to be trusted with a rank). The publication is itself
a ``compare_set``, so exactly one member list is ever published for an epoch,
even when a slow leader and its successor publish at once, and every rank
reads that one. Only members of the base epoch (``eligible``) may claim a term:
a stale or joining rank can never lead, so it can never put itself in. The
whole agreement is bounded by ``timeout_s`` (the rebuild budget).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group.fencing import FencedError
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

#: How often a leader asks its ``silent`` callable while it waits (one store read each).
SILENT_CHECK_S = 0.1


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
          place, timeout_s: float = 30.0, eligible: list[int] | None = None,
          lease_s: float = 1.0, suspects: Iterable[int] = (),
          silent: Callable[[], Iterable[int]] | None = None) -> Membership:
    """Register ``me`` at ``epoch`` and return the agreed membership.

    Args:
        expected: the ranks this rank believes will continue (a leader stops
            waiting once they all registered).
        window_s: how long a leader waits for stragglers.
        place: ``place(members) -> placement`` (the leader computes it).
        timeout_s: how long the whole agreement may take.
        eligible: the ranks that may lead (the base epoch's members); None: any.
        lease_s: how long past ``window_s`` a leader may take to publish before
            a follower takes over.
        suspects: the ranks this rank's own reports named (registered with it: a
            leader does not wait for a rank another member named, only takes it if
            it registered by then — one rank's report may name only part of a lost
            node, and its peer's the rest).
        silent: the ranks this rank's watchdog finds dead or silent right now
            (asked every ``SILENT_CHECK_S`` while this rank leads): a leader does not
            wait for them either. After a partition the first report may name one of
            a node's ranks; the others' heartbeats go stale a moment later, during
            the window, and nobody's report names them.

    Raises:
        FencedError: ``me`` is not a member of ``epoch``.
        TimeoutError: no leader published in time.
    """
    store.set(keys.registered(group, epoch, me), json.dumps(sorted(suspects)))
    published = keys.members(group, epoch)
    may_lead = eligible is None or me in eligible
    deadline = time.monotonic() + timeout_s
    term, failed_leaders = 0, []
    term_seen_at = None  # when this rank first saw term ``term``'s leader
    while not store.check([published]):
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"group {group}: no membership published for epoch {epoch}")
        leader = _leader_of(store, group, epoch, term)
        if leader is None and may_lead:
            leader = _claim(store, group, epoch, term, me)
        if leader == me:
            _lead(store, group, epoch, me, expected, window_s, place, failed_leaders,
                  min(deadline, time.monotonic() + window_s), silent)
            break
        if leader is not None and term_seen_at is None:
            term_seen_at = now
        if term_seen_at is not None and now - term_seen_at > window_s + lease_s:
            # The leader of this term let its lease run out: the next term's.
            failed_leaders.append(leader)
            term, term_seen_at = term + 1, None
            continue
        time.sleep(0.005)
    data = json.loads(store.get(published))
    membership = Membership(epoch, tuple(data["members"]),
                            {int(r): tuple(e) for r, e in data["placement"].items()}, data["leader"])
    if me not in membership.members:
        raise FencedError(group, me, epoch - 1, epoch)
    return membership


def _named_by(registration: bytes) -> set[int]:
    """The suspects a member registered with (older members register ``1``: none)."""
    try:
        value = json.loads(registration)
    except ValueError:
        return set()
    return {int(r) for r in value} if isinstance(value, list) else set()


def _leader_of(store, group: str, epoch: int, term: int) -> int | None:
    """The rank that claimed ``term``, or None (one atomic read, as in pending_join)."""
    value = store.compare_set(keys.leader_term(group, epoch, term), _NO_REQUEST,
                              _NO_REQUEST).decode()
    return None if value == _NO_REQUEST else int(value)


def _claim(store, group: str, epoch: int, term: int, me: int) -> int:
    """Claim ``term`` for ``me``; returns whoever holds it (``me`` if the claim won)."""
    return int(store.compare_set(keys.leader_term(group, epoch, term), "", str(me)).decode())


def _silent_now(silent: Callable[[], Iterable[int]], epoch: int) -> set[int]:
    """``silent()``, or nothing if it fails (logged: the leader then waits out its window,
    as it would without it)."""
    try:
        return {int(r) for r in silent()}
    except Exception:  # noqa: BLE001 - a liveness read must not break the agreement
        logger.exception("epoch %d: the leader could not read which ranks are silent", epoch)
        return set()


def _lead(store, group: str, epoch: int, me: int, expected: list[int], window_s: float,
          place, failed_leaders: list[int], window_ends: float,
          silent: Callable[[], Iterable[int]] | None = None) -> None:
    """Wait for the expected ranks (until ``window_ends``), then publish the members, unless
    another term's leader published first (``compare_set``: one publication per epoch)."""
    registered: set[int] = set()
    named: set[int] = set()  # suspects of the members registered so far, and silent ranks
    ranks = sorted(set(expected) | {me})
    next_silent_check = time.monotonic()
    while time.monotonic() < window_ends:
        if silent is not None and time.monotonic() >= next_silent_check:
            named.update(_silent_now(silent, epoch))
            next_silent_check = time.monotonic() + SILENT_CHECK_S
        for r in ranks:
            if r not in registered and store.check([keys.registered(group, epoch, r)]):
                registered.add(r)
                named.update(_named_by(store.get(keys.registered(group, epoch, r))))
        awaited = [r for r in expected if r not in failed_leaders and r not in named]
        if all(r in registered for r in awaited):
            break
        time.sleep(0.005)
    candidates = (set(expected) | {me}) - set(failed_leaders)
    members = sorted(r for r in candidates if store.check([keys.registered(group, epoch, r)]))
    placement = place(members)
    store.compare_set(keys.members(group, epoch), "", json.dumps(
        {"members": members, "leader": me,
         "placement": {str(r): list(e) for r, e in placement.items()}}))
