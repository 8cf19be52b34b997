"""A gloo process group that is rebuilt, not repaired: one communicator per epoch.

The torchft contract: :meth:`ElasticProcessGroup.configure` always aborts the
old communicator first (never a blocking destroy with a dead peer) and builds
the new one under a fresh, epoch-scoped store prefix, so a rank left behind in
an old epoch cannot reach the new communicator. The groups are stateless (not
registered with ``torch.distributed``'s default group): ``cpu_collectives``
calls their methods directly.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup


#: Floor of a communicator's own timeout: its first collectives (profiling, warm-up) can
#: start tens of seconds apart across ranks on a loaded host. The watchdog's deadlines,
#: not this, are what bound a steady-state call.
MIN_PG_TIMEOUT_S = 120.0


def pg_timeout(rebuild_budget_s: float) -> timedelta:
    """The timeout of the first epoch's communicator: the rebuild budget, at least
    MIN_PG_TIMEOUT_S (its first collectives are profiling and warm-up)."""
    return timedelta(seconds=max(rebuild_budget_s, MIN_PG_TIMEOUT_S))


def rebuilt_pg_timeout(rebuild_budget_s: float) -> timedelta:
    """The timeout of a rebuilt communicator (epoch > 0): the rebuild budget. Its
    constructor is a rendezvous of the agreed members; one that died after the agreement
    must not hold the survivors past the budget (the group goes to FAILED instead)."""
    return timedelta(seconds=rebuild_budget_s)


class ElasticProcessGroup:
    def __init__(self, store, timeout: timedelta = timedelta(seconds=60)):
        self.store = store
        self.timeout = timeout
        self.pg: ProcessGroup | None = None
        self._pg_timeout = timeout
        self.prefix: str | None = None
        #: Aborted communicators and when, kept until no collective can touch them.
        self._retired: list[tuple[ProcessGroup, float, float]] = []

    def configure(self, prefix: str, rank: int, world_size: int,
                  timeout: timedelta | None = None) -> ProcessGroup:
        """Abort the current communicator; return a new one over ``world_size`` ranks (its
        rendezvous and collectives bounded by ``timeout``, default the group's)."""
        self.abort()
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, self.store), rank, world_size,
                                        timeout or self.timeout)
        self._pg_timeout = timeout or self.timeout  # when it can be released after abort
        self.prefix = prefix
        return self.pg

    def abort(self) -> None:
        """Drop the communicator without talking to its peers (returns in microseconds).

        The aborted group is kept referenced, not destroyed at once: destroying
        a ProcessGroupGloo whose last collective still waits on a stopped peer
        blocks until that collective's timeout (measured: the full group
        timeout, on the thread that drops the last reference). Once its timeout
        has passed no collective of it can still wait, so it is released then
        (at the next abort: a retired group costs a few idle threads and sockets,
        and a group that faults often must not pile them up).
        """
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception:  # already broken: nothing left to release
                pass
            self._retired.append((pg, time.monotonic(), self._pg_timeout.total_seconds()))
        self._release_retired()

    def _release_retired(self) -> int:
        """Drop the retired communicators whose collectives have all timed out by now."""
        now = time.monotonic()
        keep = [(pg, at, timeout_s) for pg, at, timeout_s in self._retired
                if now - at <= timeout_s]
        released = len(self._retired) - len(keep)
        self._retired = keep  # the released ones' destructors run here (nothing waits)
        return released

    def shutdown(self) -> None:
        self.abort()
