#!/usr/bin/env python
"""Kernel benchmark: CPU MoE dispatch and combine latency, with and without the rank watchdog.

For every case (ranks x tokens per rank x hidden size) real gloo ranks run the
CPU dispatch (all-gatherv of hidden states, top-k weights and ids) and combine
(reduce-scatterv), alternating bare calls with calls under the rank watchdog
(deadline armed, heartbeats running), and a gloo all_to_all_single moving what a
true all-to-all dispatch would move (each token to top_k ranks) as the
bandwidth reference. Rank 0's timings are reported.

Per case and op: ``p50_us``, ``p99_us`` (bare), ``guarded_p50_us``,
``watchdog_overhead_us`` (guarded p50 - bare p50: noisy on a loaded 2-core
machine), ``watchdog_overhead_pct``, ``guard_cost_us`` (begin+end measured in
a tight loop: the watchdog's own cost per call), ``MBps`` and, for dispatch,
``alltoall_reference_p50_us``.

    python benchmarks/dispatch_combine.py --ranks 2 4 --tokens 16 128 512 --hidden 1024 4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vllm_elastic_ft.comm import cpu_collectives
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.comm.transport import GlooTransport
from vllm_elastic_ft.testing.harness import RankGroup
from vllm_elastic_ft.watchdog.guarded import guarded_combine, guarded_dispatch
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings

TOP_K = 2


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(fn) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1000.0


def _guard_cost_us(watchdog: RankWatchdog, n: int = 20000) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        watchdog.end(watchdog.begin("bench"))
    return (time.perf_counter_ns() - start) / 1000.0 / n


def _bench_rank(rank: int, world: int, store_address: str, cases: list[tuple[int, int]],
                iters: int, native: bool) -> list[dict]:
    settings = WatchdogSettings(deadline_s=30.0, warmup_calls=0, prefer_native=native)
    watchdog = RankWatchdog(settings, connect_store(store_address), "bench", rank, world)
    group = dist.group.WORLD
    transport = GlooTransport.over(group)
    results = []
    for tokens, hidden in cases:
        sizes = [tokens] * world
        x = torch.randn(tokens, hidden)
        w = torch.rand(tokens, TOP_K)
        ids = torch.randint(0, 8, (tokens, TOP_K), dtype=torch.int32)
        partial = torch.randn(tokens * world, hidden)
        per_peer = max(1, tokens * min(TOP_K, world) // world)
        a2a_in = torch.randn(per_peer * world, hidden)
        a2a_out = torch.empty_like(a2a_in)
        timings: dict[str, list[float]] = {k: [] for k in
                                           ("dispatch", "dispatch_g", "combine", "combine_g", "a2a")}
        for i in range(iters + 3):  # 3 warm-up rounds, not recorded
            calls = {
                "dispatch": lambda: cpu_collectives.all_gatherv([x, w, ids], sizes, group),
                "dispatch_g": lambda: guarded_dispatch(watchdog, transport, [x, w, ids], sizes),
                "combine": lambda: cpu_collectives.reduce_scatterv(partial, sizes, group),
                "combine_g": lambda: guarded_combine(watchdog, transport, partial, sizes),
                "a2a": lambda: dist.all_to_all_single(a2a_out, a2a_in, group=group),
            }
            # Alternate bare-first and guarded-first rounds: cache warmth from the
            # previous call must not favour either side. Same order on every rank.
            order = list(calls) if i % 2 == 0 else ["dispatch_g", "dispatch", "combine_g",
                                                    "combine", "a2a"]
            sample = {k: _timed(calls[k]) for k in order}
            if i >= 3:
                for k, v in sample.items():
                    timings[k].append(v)
        guard_us = _guard_cost_us(watchdog)
        row_bytes = hidden * 4 + TOP_K * 8
        for op, nbytes in (("dispatch", tokens * row_bytes * world),
                           ("combine", tokens * world * hidden * 4)):
            bare, guarded = timings[op], timings[op + "_g"]
            p50, g50 = statistics.median(bare), statistics.median(guarded)
            result = {
                "op": op, "ranks": world, "tokens_per_rank": tokens, "hidden": hidden,
                "iters": iters, "p50_us": round(p50, 1), "p99_us": round(_pct(bare, 0.99), 1),
                "guarded_p50_us": round(g50, 1), "guarded_p99_us": round(_pct(guarded, 0.99), 1),
                "watchdog_overhead_us": round(g50 - p50, 2),
                "watchdog_overhead_pct": round(100 * (g50 - p50) / p50, 2),
                "guard_cost_us": round(guard_us, 3),
                "guard_cost_pct": round(100 * guard_us / p50, 4),
                "MBps": round(nbytes / p50, 1),
                "monitor": watchdog.monitor_backend,
            }
            if op == "dispatch":
                result["alltoall_reference_p50_us"] = round(statistics.median(timings["a2a"]), 1)
            results.append(result)
    watchdog.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--python-monitor", action="store_true",
                        help="use the pure-Python deadline monitor instead of the native core")
    parser.add_argument("--out", type=Path, default=Path("runs/dispatch_combine.json"))
    args = parser.parse_args(argv)

    cases = list(itertools.product(args.tokens, args.hidden))
    rows: list[dict] = []
    for world in args.ranks:
        print(f"== {world} ranks, {len(cases)} cases x {args.iters} iterations ==", flush=True)
        with RankGroup(_bench_rank, world, cases, args.iters, not args.python_monitor) as group:
            rows += group.results([0], timeout_s=1800)[0]
    header = (f"{'op':>8} {'ranks':>5} {'tokens':>6} {'hidden':>6} {'p50 us':>9} {'p99 us':>9} "
              f"{'wd p50':>9} {'wd +us':>8} {'wd +%':>7} {'guard us':>8} {'MB/s':>8} {'a2a p50':>9}")
    print(header)
    for r in rows:
        print(f"{r['op']:>8} {r['ranks']:>5} {r['tokens_per_rank']:>6} {r['hidden']:>6} "
              f"{r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['guarded_p50_us']:>9.1f} "
              f"{r['watchdog_overhead_us']:>8.1f} {r['watchdog_overhead_pct']:>7.2f} "
              f"{r['guard_cost_us']:>8.3f} {r['MBps']:>8.1f} "
              f"{r.get('alltoall_reference_p50_us', float('nan')):>9.1f}")
    for r in rows:
        print(json.dumps({"bench": "dispatch_combine", **r}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
