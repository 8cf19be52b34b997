#!/usr/bin/env python
"""Output tokens/s of the tiny MoE served at DP=1, 2 and 4 (EP on for DP>1).

Each layout gets its own real vLLM server with the plugin; the same bounded
closed-loop load (fixed prompts, greedy, fixed output length) runs against each.
Prints a table and one JSON line per layout, and writes all of them to --out.

    python benchmarks/serve_throughput.py --dp 1 2 4 --requests 64 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vllm_elastic_ft.loadgen import run_load
from vllm_elastic_ft.testing.server import ServerSpec, VLLMServer
from vllm_elastic_ft.testing.tiny_moe import build_tiny_moe

PROMPTS = [
    "The quick brown fox", "Wide expert parallel serving", "0 1 2 3 4 5",
    "def f(x): return", "When one rank dies or hangs", "Questions and answers",
]


def bench_layout(model: str, dp: int, args: argparse.Namespace, log_dir: Path) -> dict:
    spec = ServerSpec(model, data_parallel_size=dp, expert_parallel=dp > 1,
                      extra_args=["--elastic-ft-cpu-dispatch", args.cpu_dispatch])
    with VLLMServer(spec, log_dir / f"dp{dp}.log") as server:
        startup_s = server.wait_ready()
        run_load(server.url, PROMPTS, args.concurrency, args.concurrency,
                 args.max_tokens, progress_every_s=None)  # warm-up
        summary = run_load(server.url, PROMPTS, args.requests, args.concurrency,
                           args.max_tokens)
    return {
        "bench": "serve_throughput",
        "dp": dp,
        "expert_parallel": dp > 1,
        "cpu_dispatch": args.cpu_dispatch,
        "requests": args.requests,
        "requests_ok": summary.ok,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "output_tokens": summary.output_tokens,
        "wall_s": round(summary.wall_s, 3),
        "output_tokens_per_s": round(summary.output_tokens_per_s, 1),
        "startup_s": round(startup_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cpu-dispatch", default="all_to_all", choices=["all_to_all", "allgather"])
    parser.add_argument("--out", type=Path, default=Path("runs/serve_throughput.json"))
    args = parser.parse_args(argv)

    model = str(build_tiny_moe())
    log_dir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    results = []
    for dp in args.dp:
        print(f"== DP={dp} (EP {'on' if dp > 1 else 'off'}) ==", flush=True)
        result = bench_layout(model, dp, args, log_dir)
        results.append(result)
        print(json.dumps(result), flush=True)

    print(f"\n{'DP':>3} {'EP':>4} {'ok':>7} {'tokens':>7} {'wall s':>7} {'out tok/s':>10} {'start s':>8}")
    for r in results:
        print(f"{r['dp']:>3} {str(r['expert_parallel']):>4} {r['requests_ok']:>3}/{r['requests']:<3} "
              f"{r['output_tokens']:>7} {r['wall_s']:>7.1f} {r['output_tokens_per_s']:>10.1f} "
              f"{r['startup_s']:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON written to {args.out}; server logs in {log_dir}")
    return 0 if all(r["requests_ok"] == r["requests"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
