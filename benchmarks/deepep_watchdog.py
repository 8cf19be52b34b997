#!/usr/bin/env python
"""Kernel benchmark on GPU: DeepEP dispatch/combine latency with and without the rank watchdog.

Runs the real ``deep_ep.Buffer`` (high-throughput ``dispatch``/``combine`` and
low-latency ``low_latency_dispatch``/``low_latency_combine`` with receive
hooks) on one process per local GPU over NCCL, alternating bare calls with the
same calls through :class:`WatchedDeepEPBuffer`, and prints the same fields as
``dispatch_combine.py`` (``p50_us``, ``p99_us``, ``watchdog_overhead_us``,
``watchdog_overhead_pct``). On a machine without CUDA or without ``deep_ep``
it says so and exits 0: the CPU path is ``benchmarks/dispatch_combine.py``.

    python benchmarks/deepep_watchdog.py --tokens 128 512 --hidden 4096 7168
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (this benchmark needs GPUs; the CPU path is dispatch_combine.py)"
    if torch.cuda.device_count() < 2:
        return "DeepEP needs at least 2 GPUs"
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return "deep_ep is not installed (see README: GPU install)"
    return None


def _timed_us(fn) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter_ns()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter_ns() - start) / 1000.0


def _summary(mode: str, op: str, tokens: int, hidden: int, ranks: int, bare: list[float],
             watched: list[float]) -> dict:
    p50, w50 = statistics.median(bare), statistics.median(watched)
    ordered = sorted(bare)
    return {"bench": "deepep_watchdog", "mode": mode, "op": op, "ranks": ranks,
            "tokens_per_rank": tokens, "hidden": hidden, "p50_us": round(p50, 1),
            "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))], 1),
            "guarded_p50_us": round(w50, 1), "watchdog_overhead_us": round(w50 - p50, 2),
            "watchdog_overhead_pct": round(100 * (w50 - p50) / p50, 2)}


def _alternate(mode: str, buffer, watchdog, iters: int, dispatch, combine, shape) -> list[dict]:
    """Time dispatch then combine on the bare and the watched buffer, alternating, 3 warm-up rounds."""
    from vllm_elastic_ft.watchdog.deepep import WatchedDeepEPBuffer

    variants = ((buffer, ""), (WatchedDeepEPBuffer(buffer, watchdog), "_w"))
    samples: dict[str, list[float]] = {op + sfx: [] for op in ("dispatch", "combine")
                                       for _, sfx in variants}
    for i in range(iters + 3):
        for buf, suffix in variants:
            state: dict = {}
            d = _timed_us(lambda: dispatch(buf, state))
            c = _timed_us(lambda: combine(buf, state))
            if i >= 3:
                samples["dispatch" + suffix].append(d)
                samples["combine" + suffix].append(c)
    tokens, hidden, world = shape
    return [_summary(mode, op, tokens, hidden, world, samples[op], samples[op + "_w"])
            for op in ("dispatch", "combine")]


def _rank_main(rank: int, world: int, port: int, store_port: int, args, out_queue) -> None:
    import deep_ep
    import torch
    import torch.distributed as dist

    from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    group = dist.new_group(list(range(world)))
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, wait_for_workers=False,
                          timeout=timedelta(seconds=30))
    watchdog = RankWatchdog(WatchdogSettings(deadline_s=10.0, warmup_calls=0), store,
                            "deepep-bench", rank, world)
    rows = []
    num_experts = args.experts
    for tokens, hidden in itertools.product(args.tokens, args.hidden):
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        scores = torch.randn(tokens, num_experts, device="cuda")
        topk_weights, topk_idx = torch.topk(scores.softmax(-1), args.top_k)
        topk_idx = topk_idx.to(deep_ep.topk_idx_t if hasattr(deep_ep, "topk_idx_t") else torch.int64)

        # High throughput (intranode, NVLink).
        ht = deep_ep.Buffer(group, int(2e9), 0)
        layout = ht.get_dispatch_layout(topk_idx, num_experts)

        def ht_dispatch(buf, state):
            state["out"] = buf.dispatch(
                x=x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                topk_idx=topk_idx, topk_weights=topk_weights)

        def ht_combine(buf, state):
            recv_x, _, recv_w, _, handle, _ = state["out"]
            buf.combine(x=recv_x, handle=handle, topk_weights=recv_w)

        rows += _alternate("ht", ht, watchdog, args.iters, ht_dispatch, ht_combine,
                           (tokens, hidden, world))
        ht.destroy() if hasattr(ht, "destroy") else None

        # Low latency (receive hooks).
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, world, num_experts)
        ll = deep_ep.Buffer(group, 0, rdma, low_latency_mode=True,
                            num_qps_per_rank=max(1, num_experts // world))

        def ll_dispatch(buf, state):
            recv_x, _, handle, _, hook = buf.low_latency_dispatch(
                x, topk_idx, tokens, num_experts, use_fp8=False, return_recv_hook=True)
            hook()
            state["recv"] = (recv_x, handle)

        def ll_combine(buf, state):
            recv_x, handle = state["recv"]
            _, _, hook = buf.low_latency_combine(recv_x, topk_idx, topk_weights, handle,
                                                 return_recv_hook=True)
            hook()

        rows += _alternate("ll", ll, watchdog, args.iters, ll_dispatch, ll_combine,
                           (tokens, hidden, world))
        ll.destroy() if hasattr(ll, "destroy") else None
    watchdog.shutdown()
    if rank == 0:
        out_queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=0, help="GPUs to use (0: all)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/deepep_watchdog.json"))
    args = parser.parse_args(argv)

    reason = _skip_reason()
    if reason:
        print(f"SKIPPED deepep_watchdog: {reason}")
        print(json.dumps({"bench": "deepep_watchdog", "skipped": reason}))
        return 0
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from vllm_elastic_ft.testing.harness import free_port

    world = args.ranks or torch.cuda.device_count()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out_queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, store.port, args, out_queue))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = out_queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    for r in rows:
        print(f"{r['mode']:>3} {r['op']:>8} ranks={r['ranks']} tokens={r['tokens_per_rank']:>5} "
              f"hidden={r['hidden']:>5} p50={r['p50_us']:>8.1f}us p99={r['p99_us']:>8.1f}us "
              f"watchdog +{r['watchdog_overhead_us']:.2f}us ({r['watchdog_overhead_pct']:.2f}%)")
    for r in rows:
        print(json.dumps(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    sys.exit(main())
