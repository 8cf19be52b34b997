#!/usr/bin/env python
"""Detection and in-process recovery times on real gloo ranks (the harness, not vLLM).

For each fault (SIGKILL or SIGSTOP of one rank of a 4-rank MoE loop), runs the
elastic loop (``testing/elastic_moe_loop.py``) and measures, per survivor:

* ``detect_s``: fault -> this rank's FaultReport naming the victim;
* ``fence_s``: fault -> this rank fenced the epoch;
* ``rebuild_s``: fault -> new communicator and placement in place;
* ``interruption_s``: fault -> first correct step at the new epoch;

and checks that every output matched the dense reference. Prints a table and
JSON lines, writes ``runs/harness_recovery.json``.

    python benchmarks/harness_recovery.py --faults kill stop --victims 0 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from vllm_elastic_ft import faults
from vllm_elastic_ft.testing.elastic_moe_loop import (
    STOP_KEY, ElasticLoopSpec, run_elastic_loop, wait_for_progress,
)
from vllm_elastic_ft.testing.harness import RankGroup
from vllm_elastic_ft.watchdog.rank_watchdog import WatchdogSettings

WORLD = 4


def _first(timeline: list, prefix: str) -> float | None:
    return next((t for t, what in timeline if what.startswith(prefix)), None)


def run_case(fault: str, victim: int, settings: WatchdogSettings) -> list[dict]:
    survivors = [r for r in range(WORLD) if r != victim]
    with RankGroup(run_elastic_loop, WORLD, ElasticLoopSpec(), settings) as group:
        wait_for_progress(group.store, range(WORLD), 0, 8)
        injection = faults.signal_process(fault, group.pids[victim], victim)
        wait_for_progress(group.store, survivors, 1, 10)
        group.store.set(STOP_KEY, "1")
        results = group.results(survivors, timeout_s=60)
        if fault == "stop":
            faults.signal_process("cont", group.pids[victim], victim)
    rows = []
    for rank, r in results.items():
        report = next((x for x in r["reports"] if victim in x["suspects"]), None)
        marks = {name: _first(r["timeline"], prefix) for name, prefix in (
            ("fence", "fenced"), ("rebuild", "rebuilt"), ("serving", "serving at epoch 1"))}
        rows.append({
            "bench": "harness_recovery", "fault": fault, "victim": victim, "rank": rank,
            "detect_s": round(report["detected_at"] - injection.at, 3) if report else None,
            "kind": report["kind"] if report else None,
            "fence_s": round(marks["fence"] - injection.at, 3) if marks["fence"] else None,
            "rebuild_s": round(marks["rebuild"] - injection.at, 3) if marks["rebuild"] else None,
            "interruption_s": round(marks["serving"] - injection.at, 3) if marks["serving"] else None,
            "outputs_match_reference": r["mismatches"] == 0,
            "loaded_from_checkpoint": r["loaded_from_checkpoint"],
            "final_state": r["state"], "live_ranks": r["members"],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faults", nargs="+", choices=("kill", "stop"), default=["kill", "stop"])
    parser.add_argument("--victims", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--deadline-s", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("runs/harness_recovery.json"))
    args = parser.parse_args(argv)
    settings = WatchdogSettings(deadline_s=args.deadline_s, warmup_calls=10,
                                heartbeat_interval_s=0.05)
    rows: list[dict] = []
    for fault in args.faults:
        for victim in args.victims:
            for i in range(args.repeats):
                print(f"== {fault} rank {victim} (run {i + 1}/{args.repeats}) ==", flush=True)
                rows += run_case(fault, victim, settings)
    print(f"\n{'fault':>5} {'victim':>6} {'rank':>4} {'kind':>5} {'detect s':>8} {'fence s':>8} "
          f"{'rebuild s':>9} {'interrupt s':>11} {'ok':>3}")
    for r in rows:
        print(f"{r['fault']:>5} {r['victim']:>6} {r['rank']:>4} {str(r['kind']):>5} "
              f"{r['detect_s']!s:>8} {r['fence_s']!s:>8} {r['rebuild_s']!s:>9} "
              f"{r['interruption_s']!s:>11} {'yes' if r['outputs_match_reference'] else 'NO':>3}")
    for key in ("detect_s", "interruption_s"):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            print(f"{key}: median {statistics.median(values):.3f}s, max {max(values):.3f}s")
    for r in rows:
        print(json.dumps(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["outputs_match_reference"] and r["interruption_s"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
