"""Variable-size all-gather and reduce-scatter over a CPU (gloo) process group.

These are the two collectives behind the MoE dispatch and combine of vLLM's
``allgather_reducescatter`` all2all manager, the only one that exists on CPU:

* dispatch = :func:`all_gatherv`: every rank receives every rank's tokens
  (hidden states, top-k weights, top-k ids), ``sizes[r]`` rows from rank ``r``;
* combine = :func:`reduce_scatterv`: every rank holds partial expert outputs for
  all ``sum(sizes)`` tokens, and gets back the sum over ranks of its own rows.

gloo has neither a variable-size all-gather nor a reduce-scatter, so:

* ``all_gatherv`` packs all tensors of a call into one byte matrix (one
  collective instead of one per tensor), pads every rank's rows to the largest
  count, all-gathers it and trims the padding;
* ``reduce_scatterv`` either all-to-alls each rank's rows to their owner and sums
  them locally (``"all_to_all"``: each byte crosses the wire once) or all-reduces
  the whole matrix and slices (``"allgather"``: the fallback, ~2x the bytes plus a
  full-size reduction on every rank).

This module is a plain library: it never arms deadlines itself; the watchdog
wraps these calls from the patch that owns them. Given a ``timeout``, each
collective runs as an async op with a bounded wait, so a closed peer socket or a
peer that never arrives surfaces as a ``RuntimeError`` instead of a block.
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

REDUCE_SCATTER_MODES = ("all_to_all", "allgather")


#: With a ``cancelled`` check, a wait runs in slices this long; between slices
#: the check may give up early (a gloo wait that timed out can be waited again).
WAIT_SLICE_S = 0.05

Cancelled = Callable[[], bool]


class CollectiveCancelled(RuntimeError):
    """The caller gave up on a collective before its timeout (a peer is known to be gone)."""


def finish(work, timeout: timedelta | None, cancelled: Cancelled | None = None) -> None:
    """Wait for a collective, at most ``timeout`` (None: as long as the group's own timeout).

    With ``cancelled``, give up as soon as it returns True (checked every
    ``WAIT_SLICE_S``); a collective that completes in time costs one wait.
    """
    if timeout is None:
        work.wait()
        return
    if cancelled is None:
        work.wait(timeout)
        return
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        remaining = deadline - time.monotonic()
        try:
            work.wait(timedelta(seconds=max(0.0, min(remaining, WAIT_SLICE_S))))
            return
        except RuntimeError as err:
            if remaining <= WAIT_SLICE_S or "timed out" not in str(err).lower():
                raise
            if cancelled():
                raise CollectiveCancelled(f"given up after {timeout.total_seconds() - remaining + WAIT_SLICE_S:.2f}s: "
                                          "a peer of this group is known to have failed") from err


def _as_byte_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` (rows along dim 0) as a ``[rows, nbytes]`` uint8 matrix."""
    # Explicit width: reshape(n, -1) is ambiguous when n == 0 (an idle rank).
    return t.contiguous().reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8)


def all_gatherv(
    tensors: Sequence[torch.Tensor],
    sizes: Sequence[int],
    group: ProcessGroup,
    timeout: timedelta | None = None,
    cancelled: Cancelled | None = None,
) -> list[torch.Tensor]:
    """Gather every rank's rows of each tensor, concatenated in rank order.

    Args:
        tensors: this rank's tensors; each has ``sizes[rank]`` rows (dim 0) and
            the same trailing shape and dtype on every rank.
        sizes: row count of every rank, indexed by rank in ``group``.
        group: a gloo process group.
        timeout: bound on the wait (None: block as the group's own timeout says).
        cancelled: checked while waiting; True gives up early (CollectiveCancelled).

    Returns:
        One tensor per input, ``[sum(sizes), *trailing]``, same dtype.
    """
    # The group's own methods: they work for registered groups and for the
    # stateless, epoch-scoped ones the rebuild creates alike.
    world, rank = group.size(), group.rank()
    if len(sizes) != world:
        raise ValueError(f"sizes has {len(sizes)} entries for a group of {world}")
    num_rows = tensors[0].shape[0]
    if any(t.shape[0] != num_rows for t in tensors) or num_rows != sizes[rank]:
        raise ValueError(
            f"rank {rank}: every tensor must have sizes[{rank}]={sizes[rank]} rows, "
            f"got {[tuple(t.shape) for t in tensors]}"
        )
    byte_rows = [_as_byte_rows(t) for t in tensors]
    widths = [b.shape[1] for b in byte_rows]
    max_rows = max(sizes)
    packed = torch.zeros((max_rows, sum(widths)), dtype=torch.uint8)
    if num_rows:
        torch.cat(byte_rows, dim=1, out=packed[:num_rows])
    gathered = torch.empty((world * max_rows, packed.shape[1]), dtype=torch.uint8)
    # ProcessGroup methods rather than torch.distributed wrappers: the wrappers
    # accept only groups registered with the default group, not the stateless
    # epoch-scoped groups a rebuild creates.
    finish(group._allgather_base(gathered, packed), timeout, cancelled)
    # Drop each rank's padding, then cut the byte columns back into tensors.
    per_rank = gathered.view(world, max_rows, -1)
    rows = torch.cat([per_rank[r, : sizes[r]] for r in range(world)], dim=0)
    outputs = []
    for t, chunk in zip(tensors, torch.split(rows, widths, dim=1)):
        out = chunk.contiguous().view(t.dtype)
        outputs.append(out.reshape((rows.shape[0],) + tuple(t.shape[1:])))
    return outputs


def reduce_scatterv(
    tensor: torch.Tensor,
    sizes: Sequence[int],
    group: ProcessGroup,
    mode: str = "all_to_all",
    timeout: timedelta | None = None,
    cancelled: Cancelled | None = None,
) -> torch.Tensor:
    """Sum ``tensor`` over ranks and return this rank's rows.

    Args:
        tensor: ``[sum(sizes), *trailing]`` partial results on every rank.
        sizes: row count owned by every rank, in rank order.
        group: a gloo process group.
        mode: ``"all_to_all"`` or ``"allgather"`` (see the module docstring).
        timeout: bound on the wait (None: block as the group's own timeout says).
        cancelled: checked while waiting; True gives up early (CollectiveCancelled).

    Returns:
        ``[sizes[rank], *trailing]``: the element-wise sum over ranks of the rows
        that ``rank`` owns.
    """
    # The group's own methods: they work for registered groups and for the
    # stateless, epoch-scoped ones the rebuild creates alike.
    world, rank = group.size(), group.rank()
    if len(sizes) != world or tensor.shape[0] != sum(sizes):
        raise ValueError(
            f"reduce_scatterv: tensor has {tensor.shape[0]} rows, sizes={list(sizes)} "
            f"for a group of {world}"
        )
    start = sum(sizes[:rank])
    if mode == "allgather":
        reduced = tensor.contiguous().clone()
        finish(group.allreduce([reduced]), timeout, cancelled)
        return reduced[start : start + sizes[rank]]
    if mode != "all_to_all":
        raise ValueError(f"mode must be one of {list(REDUCE_SCATTER_MODES)}, got {mode!r}")
    mine = sizes[rank]
    received = torch.empty(
        (world * mine,) + tuple(tensor.shape[1:]), dtype=tensor.dtype
    )
    work = group.alltoall_base(received, tensor.contiguous(), [mine] * world, list(sizes),
                               dist.AllToAllOptions())
    finish(work, timeout, cancelled)
    return received.view((world, mine) + tuple(tensor.shape[1:])).sum(dim=0)
