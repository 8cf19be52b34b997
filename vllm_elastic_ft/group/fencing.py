"""The group epoch as a fencing token, kept in the store every rank reaches.

``fence`` moves the epoch forward with one atomic compare-and-set, so when
several survivors fence the same fault at once the epoch moves exactly once
and every one of them learns the same new value. A rank compares its own epoch
with :func:`current_epoch` (its watcher does, every heartbeat); a rank that is
behind is fenced out: it must not communicate, and it can only come back by
joining at the new epoch. Communicators and keys are epoch-scoped
(``comm/keys.py``), so a stale rank cannot reach the new group's
communicator even by accident.
"""

from __future__ import annotations

from vllm_elastic_ft.comm import keys


class FencedError(RuntimeError):
    """This rank's epoch is behind the group's: it must not communicate."""

    def __init__(self, group: str, rank: int, own_epoch: int, group_epoch: int):
        super().__init__(f"group {group} rank {rank}: fenced out (own epoch {own_epoch}, "
                         f"group epoch {group_epoch}); refusing to communicate")
        self.own_epoch = own_epoch
        self.group_epoch = group_epoch


def current_epoch(store, group: str) -> int:
    key = keys.epoch(group)
    return int(store.get(key)) if store.check([key]) else 0


def fence(store, group: str, seen_epoch: int) -> int:
    """Move the group past ``seen_epoch``; returns the group's epoch afterwards.

    Idempotent per epoch: of several callers that saw the same epoch, one
    moves it to ``seen_epoch + 1`` and all get that value back.
    """
    expected = "" if seen_epoch == 0 and not store.check([keys.epoch(group)]) else str(seen_epoch)
    result = store.compare_set(keys.epoch(group), expected, str(seen_epoch + 1))
    return int(result)
