"""What a transport must provide for a group to survive a rank failure, and the gloo one.

A *transport* carries one group's per-step collectives (the batch sync, the
MoE dispatch and combine) at one epoch. The recovery core
(``group/member.py``) drives it through this small contract only, so a new
transport (NCCL, DeepEP, NIXL) plugs in here without touching the recovery
sequence:

* ``configure(epoch, rank, world_size)``: abort the current communicator and
  build the one of ``epoch`` (a fresh, epoch-scoped store prefix; a rank left
  behind in an old epoch cannot reach it);
* ``abort()``: drop the communicator without talking to its peers (never a
  blocking destroy with a dead peer);
* ``all_reduce`` / ``dispatch`` / ``combine``: the collectives, each bounded
  by a timeout and a ``cancelled`` check (a peer already named dead);
* ``silent_ranks()``: ranks the transport itself saw go silent (DeepEP's
  low-latency mask), evidence for the watchdog;
* ``recovery_tier``: what the transport can do on a fault, as data
  (:class:`RecoveryTier`), so the recovery core never branches on a type.

The mechanism stays plain: no watchdog, no controller here. The watchdog
wraps each call from the code that owns the call (``watchdog/guarded.py``).
"""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Callable, Protocol, Sequence

import torch

from vllm_elastic_ft.comm import cpu_collectives, keys
from vllm_elastic_ft.comm.elastic_group import ElasticProcessGroup

Cancelled = Callable[[], bool]


class RecoveryTier(str, enum.Enum):
    """What a transport can do when a rank of its group fails."""

    #: Abort, then build a new communicator over the survivors inside the running
    #: processes (gloo: measured, ``tests/test_rebuild_integ.py`` and the e2e tests).
    REBUILD_IN_PLACE = "rebuild_in_place"
    #: Carry on with the silent rank masked out, then rebuild (DeepEP low-latency
    #: with ``enable_shrink``). Not run anywhere yet: no transport claims it.
    MASKED_CONTINUE = "masked_continue"
    #: Fence the group and report FAILED at once: the orchestrator restarts the gang.
    GANG_RESTART = "gang_restart"


class Transport(Protocol):
    """The contract between the recovery core and one group's communicator."""

    name: str
    recovery_tier: RecoveryTier

    def configure(self, epoch: int, rank: int, world_size: int) -> None: ...

    def abort(self) -> None: ...

    def shutdown(self) -> None: ...

    def all_reduce(self, tensor: torch.Tensor, timeout: timedelta | None,
                   cancelled: Cancelled | None) -> None: ...

    def dispatch(self, tensors: Sequence[torch.Tensor], sizes: Sequence[int],
                 timeout: timedelta | None, cancelled: Cancelled | None) -> list[torch.Tensor]: ...

    def combine(self, tensor: torch.Tensor, sizes: Sequence[int], timeout: timedelta | None,
                cancelled: Cancelled | None) -> torch.Tensor: ...

    def silent_ranks(self) -> list[int]: ...


class GlooTransport:
    """The CPU transport: one stateless gloo group per epoch, in the group's store.

    Args:
        store: the group's store (the rendezvous of every epoch's communicator).
        group: the group's name (part of the epoch-scoped prefix).
        timeout: the communicator's own timeout (the watchdog's deadlines are tighter).
        combine_mode: ``cpu_collectives.REDUCE_SCATTER_MODES``.
        rebuilt_timeout: the timeout of a rebuilt communicator (epoch > 0), whose
            rendezvous must end within the rebuild budget; default ``timeout``.
    """

    name = "gloo"
    recovery_tier = RecoveryTier.REBUILD_IN_PLACE

    def __init__(self, store, group: str, timeout: timedelta,
                 combine_mode: str = "all_to_all", rebuilt_timeout: timedelta | None = None):
        self.group = group
        self.combine_mode = combine_mode
        self._pg = ElasticProcessGroup(store, timeout)
        self._rebuilt_timeout = rebuilt_timeout
        self._fixed = None

    @classmethod
    def over(cls, process_group, combine_mode: str = "all_to_all") -> GlooTransport:
        """A transport over an existing gloo group that is never rebuilt (vLLM's own DP
        group with in-engine rebuild off, the watchdog-only harness, benchmarks)."""
        transport = cls.__new__(cls)
        transport.group, transport.combine_mode = "", combine_mode
        transport._pg, transport._fixed = None, process_group
        return transport

    @property
    def process_group(self):
        """The current epoch's gloo group (None while aborted or not configured)."""
        return self._fixed if self._fixed is not None else self._pg.pg

    def configure(self, epoch: int, rank: int, world_size: int) -> None:
        if self._pg is None:
            raise RuntimeError("a GlooTransport over a fixed group cannot be reconfigured")
        self._pg.configure(keys.communicator(self.group, epoch), rank, world_size,
                           self._rebuilt_timeout if epoch > 0 else None)

    def abort(self) -> None:
        if self._pg is not None:
            self._pg.abort()

    def shutdown(self) -> None:
        self.abort()

    def all_reduce(self, tensor: torch.Tensor, timeout: timedelta | None,
                   cancelled: Cancelled | None) -> None:
        """SUM all-reduce of ``tensor`` in place."""
        cpu_collectives.finish(self.process_group.allreduce([tensor]), timeout, cancelled)

    def dispatch(self, tensors: Sequence[torch.Tensor], sizes: Sequence[int],
                 timeout: timedelta | None, cancelled: Cancelled | None) -> list[torch.Tensor]:
        return cpu_collectives.all_gatherv(tensors, sizes, self.process_group, timeout, cancelled)

    def combine(self, tensor: torch.Tensor, sizes: Sequence[int], timeout: timedelta | None,
                cancelled: Cancelled | None) -> torch.Tensor:
        return cpu_collectives.reduce_scatterv(tensor, sizes, self.process_group,
                                               self.combine_mode, timeout, cancelled)

    def silent_ranks(self) -> list[int]:
        return []  # gloo names nobody; heartbeats and closed sockets do


def tier_for(transport: Transport) -> RecoveryTier:
    """The recovery tier the core applies to ``transport``'s group on a fault.

    A tier a transport claims but nobody has run yet is not trusted: only
    REBUILD_IN_PLACE (run on gloo) is taken as claimed; everything else
    falls back to GANG_RESTART, the orchestrator's restart.
    """
    tier = getattr(transport, "recovery_tier", RecoveryTier.GANG_RESTART)
    return tier if tier is RecoveryTier.REBUILD_IN_PLACE else RecoveryTier.GANG_RESTART
