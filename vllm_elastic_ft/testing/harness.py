"""A multi-process harness: real processes, a real gloo process group.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes (spawn),
joins them into one gloo group over a TCPStore on loopback, runs
``fn(rank, world_size, *args)`` in each and returns the per-rank results in rank
order. A rank that raises makes the call raise with that rank's traceback.

:class:`RankGroup` is the same with the handles exposed, for failure tests:
the parent hosts a second TCPStore (``store_address``) that outlives every
rank (the watchdog's heartbeats live there), sees each rank's pid, can signal
a rank, and collects the results of the ranks that survive.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, results) -> None:
    ok, value = True, None
    try:
        if port is not None:  # None: a late joiner, outside the initial default group
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=60),
            )
        value = fn(rank, world_size, *args)
    except BaseException:  # report every failure, including SystemExit
        ok, value = False, traceback.format_exc()
    # Plain pickle: tensors travel by value, not as shared-memory handles that
    # would die with this process.
    results.put(pickle.dumps((rank, ok, value)))
    # Never destroy a process group whose peer may be dead (it can block): flush
    # the result and leave.
    results.close()
    results.join_thread()
    os._exit(0)


class RankGroup:
    """``world_size`` rank processes running ``fn(rank, world_size, store_address, *args)``."""

    def __init__(self, fn: Callable[..., Any], world_size: int, *args: Any):
        self.world_size = world_size
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=30))
        self.store_address = f"127.0.0.1:{self.store.port}"
        ctx = self._ctx = mp.get_context("spawn")
        self._fn, self._args = fn, args
        self._collected: dict[int, Any] = {}
        self._results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(target=_rank_main,
                        args=(r, world_size, port, fn, (self.store_address,) + args, self._results))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def spawn(self, rank: int, fn: Callable[..., Any] | None = None, *args: Any) -> int:
        """Start one more process as ``rank`` (a replacement), outside the default group.

        It runs ``fn(rank, world_size, store_address, *args)`` (default: the group's
        function and arguments); returns its pid. Its result comes through :meth:`results`.
        """
        fn, args = (fn, args) if fn is not None else (self._fn, self._args)
        proc = self._ctx.Process(target=_rank_main, args=(
            rank, self.world_size, None, fn, (self.store_address,) + args, self._results))
        proc.start()
        self.procs.append(proc)
        return proc.pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_key(self, key: str, timeout_s: float = 120.0) -> None:
        """Block until some rank sets ``key`` in the store."""
        deadline = time.monotonic() + timeout_s
        while not self.store.check([key]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no rank set {key!r} within {timeout_s}s")
            time.sleep(0.02)

    def results(self, ranks: list[int] | None = None, timeout_s: float = 120.0) -> dict[int, Any]:
        """Results of ``ranks`` (default all); raises with the traceback of a rank that failed."""
        wanted = set(range(self.world_size) if ranks is None else ranks)
        collected = self._collected
        deadline = time.monotonic() + timeout_s
        while wanted - collected.keys():
            try:
                rank, ok, value = pickle.loads(
                    self._results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(wanted - collected.keys())} gave no result "
                                   f"within {timeout_s}s") from None
            if not ok and rank in wanted:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            collected.setdefault(rank, value)  # a replacement of a dead rank reports later
        return {r: collected[r] for r in sorted(wanted)}

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _without_store(rank, world_size, store_address, fn, *args):
    return fn(rank, world_size, *args)


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks."""
    with RankGroup(_without_store, world_size, fn, *args) as group:
        results = group.results(timeout_s=timeout_s)
    return [results[r] for r in range(world_size)]
