"""A transport's collectives, each run under the rank watchdog.

``guarded_all_reduce`` / ``guarded_dispatch`` / ``guarded_combine`` are what
the vLLM patches, the recovery core and the multi-process harness call: a
watchdog deadline around the collective, the collective itself bounded by the
same deadline, and on failure a :class:`RankFaultError` on the calling thread
while the watchdog attributes the fault. A call also gives up early, without
waiting out its deadline, once the watchdog has named a dead or hung peer (or
the group was fenced). Where a deployment switched fault injection on, its
"slow" delay is served here, right before the rank enters the exchange,
exactly where a slow rank would lose its time; otherwise the hook is None and
costs one attribute read.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

from vllm_elastic_ft.comm.transport import Transport
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog
from vllm_elastic_ft.watchdog.report import RankFaultError

T = TypeVar("T")


def _fail(watchdog: RankWatchdog, op: str, seq: int, err: BaseException) -> RankFaultError:
    peer_closed = watchdog.collective_failed(op, seq, err)
    return RankFaultError(
        f"group {watchdog.group} epoch {watchdog.epoch} rank {watchdog.rank}: {op} seq {seq} "
        f"failed ({'peer closed' if peer_closed else 'deadline'}): {err}",
        op=op, seq=seq, peer_closed=peer_closed,
    )


def run_guarded(watchdog: RankWatchdog, op: str, call: Callable[[int], T],
                inject_delay: bool = True) -> T:
    """Run ``call(seq)`` as guarded call ``op``: deadline armed, heartbeat seq, and a
    RankFaultError (the fault queued for attribution) if it raises a RuntimeError.
    ``inject_delay``: serve fault injection's "slow" delay here (dispatch, combine)."""
    if inject_delay and watchdog.injection is not None:
        watchdog.injection.before_exchange()
    seq = watchdog.begin(op)
    try:
        return call(seq)
    except RuntimeError as err:
        raise _fail(watchdog, op, seq, err) from err
    finally:
        watchdog.end(seq)


def guarded_all_reduce(watchdog: RankWatchdog, transport: Transport, tensor: torch.Tensor,
                       op: str = "dp_sync") -> None:
    """``transport.all_reduce`` (in place) under a deadline (no injected delay)."""
    run_guarded(watchdog, op, lambda seq: transport.all_reduce(
        tensor, watchdog.wait_timeout(seq), watchdog.peer_failed), inject_delay=False)


def guarded_dispatch(watchdog: RankWatchdog, transport: Transport,
                     tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """``transport.dispatch`` under a deadline."""
    return run_guarded(watchdog, "dispatch", lambda seq: transport.dispatch(
        tensors, sizes, watchdog.wait_timeout(seq), watchdog.peer_failed))


def guarded_combine(watchdog: RankWatchdog, transport: Transport, tensor: torch.Tensor,
                    sizes: Sequence[int]) -> torch.Tensor:
    """``transport.combine`` under a deadline."""
    return run_guarded(watchdog, "combine", lambda seq: transport.combine(
        tensor, sizes, watchdog.wait_timeout(seq), watchdog.peer_failed))
