"""The CPU dispatch and combine, each run under the rank watchdog.

``guarded_dispatch`` / ``guarded_combine`` are what the vLLM patch and the
multi-process harness call: a watchdog deadline around the collective, the
collective itself bounded by the same deadline, and on failure a
:class:`RankFaultError` on the calling thread while the watchdog attributes
the fault. A call also gives up early, without waiting out its deadline, once
the watchdog has named a dead or hung peer (or the group was fenced). Fault
injection's "slow" delay is served here, right before the
rank enters the exchange, exactly where a slow rank would lose its time.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence, TypeVar

import torch
from torch.distributed import ProcessGroup

from vllm_elastic_ft.comm import cpu_collectives
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog
from vllm_elastic_ft.watchdog.report import RankFaultError

T = TypeVar("T")


def _injected_delay(watchdog: RankWatchdog) -> None:
    # Fault injection "slow": the rank reaches the exchange late, as a rank whose
    # compute or host is slow does; its peers' deadlines run meanwhile.
    if watchdog.injected_delay_s:
        time.sleep(watchdog.injected_delay_s)


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
    if inject_delay:
        _injected_delay(watchdog)
    seq = watchdog.begin(op)
    try:
        return call(seq)
    except RuntimeError as err:
        raise _fail(watchdog, op, seq, err) from err
    finally:
        watchdog.end(seq)


def guarded_dispatch(
    watchdog: RankWatchdog, tensors: Sequence[torch.Tensor], sizes: Sequence[int],
    group: ProcessGroup,
) -> list[torch.Tensor]:
    """``cpu_collectives.all_gatherv`` under a deadline."""
    return run_guarded(watchdog, "dispatch", lambda seq: cpu_collectives.all_gatherv(
        tensors, sizes, group, watchdog.wait_timeout(seq), watchdog.peer_failed))


def guarded_combine(
    watchdog: RankWatchdog, tensor: torch.Tensor, sizes: Sequence[int], group: ProcessGroup,
    mode: str = "all_to_all",
) -> torch.Tensor:
    """``cpu_collectives.reduce_scatterv`` under a deadline."""
    return run_guarded(watchdog, "combine", lambda seq: cpu_collectives.reduce_scatterv(
        tensor, sizes, group, mode, watchdog.wait_timeout(seq), watchdog.peer_failed))
