#!/usr/bin/env python
"""Lose and replace ranks again and again on one running vLLM server (a soak of rejoin).

Starts one DP=N EP server (the tiny MoE), then for each rank in ``--ranks``:
SIGKILL that rank's worker, wait until the group serves without it, ask
``POST /elastic_ft/replace`` for it while a closed-loop load runs (no client
retries), and record the admission. The first kill comes before any request
ran (the ranks are watched from start-up); each later kill comes right after
the previous admission. Per cycle: ``serving_without_s`` (kill -> group serves
without the rank), ``engine_start_s`` / ``admission_s`` (from the endpoint's
answer), ``requests_ok`` / ``requests_failed``, and the resources of every
process of the deployment (API server, engine cores, workers: threads, open
file descriptors, sockets, resident memory). The summary says how those grew,
from after the first cycle to after the last, in the processes that lived
through every cycle (issue 12: flat over 30 fault + replace cycles). Prints JSON
lines and a summary, writes ``<out>/replace_cycles.json``.

    python benchmarks/replace_cycles.py --dp 4 --ranks 1 3 0 2 1 0
    python benchmarks/replace_cycles.py --dp 2 --ranks 1 --cycles 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from vllm_elastic_ft import faults
from vllm_elastic_ft.loadgen import complete_once, run_load
from vllm_elastic_ft.testing.server import ServerSpec, VLLMServer
from vllm_elastic_ft.testing.tiny_moe import build_tiny_moe

PROMPTS = ["The quick brown fox", "Wide expert parallel serving", "0 1 2 3 4 5"]


def resources(root_pid: int) -> dict[int, dict]:
    """pid -> threads, fds, sockets, RSS (MiB) and name, for a process and its descendants."""
    import psutil

    root = psutil.Process(root_pid)
    found = {}
    for proc in [root] + root.children(recursive=True):
        try:
            with proc.oneshot():
                found[proc.pid] = {"name": proc.name(), "threads": proc.num_threads(),
                                   "fds": proc.num_fds(),
                                   "sockets": len(proc.net_connections(kind="all")),
                                   "rss_mib": round(proc.memory_info().rss / 2**20, 1)}
        except psutil.Error:  # exited meanwhile (the killed rank)
            continue
    return found


RESOURCES = ("threads", "fds", "sockets", "rss_mib")


def drift_per_cycle(samples: list[dict[int, dict]]) -> dict[str, dict[str, float]]:
    """Least-squares slope per cycle of each resource of each process alive in every sample,
    over all cycles and over the second half alone (a leak keeps its slope; a warm-up
    that levels off has a second-half slope near 0)."""
    def slope(values: list[float]) -> float:
        n = len(values)
        if n < 2:
            return 0.0
        mean_x, mean_y = (n - 1) / 2, sum(values) / n
        den = sum((x - mean_x) ** 2 for x in range(n))
        return sum((x - mean_x) * (v - mean_y) for x, v in enumerate(values)) / den

    lived = [p for p in samples[0] if all(p in s for s in samples)]
    half = len(samples) // 2
    return {f"{samples[0][p]['name']}:{p}": {
        **{f"{k}_per_cycle": round(slope([s[p][k] for s in samples]), 3) for k in RESOURCES},
        **{f"{k}_per_cycle_2nd_half": round(slope([s[p][k] for s in samples[half:]]), 3)
           for k in RESOURCES}}
        for p in lived}


def growth(first: dict[int, dict], last: dict[int, dict]) -> dict:
    """How the processes alive in both samples grew: the largest increase of each resource."""
    lived = sorted(set(first) & set(last))
    worst = {k: max((last[p][k] - first[p][k] for p in lived), default=0)
             for k in ("threads", "fds", "sockets", "rss_mib")}
    return {"processes": len(lived), "max_increase": {k: round(v, 1) for k, v in worst.items()},
            "by_process": {str(p): {"name": last[p]["name"],
                                    **{k: [first[p][k], last[p][k]]
                                       for k in ("threads", "fds", "sockets", "rss_mib")}}
                           for p in lived}}


def _serving_without(server: VLLMServer, rank: int, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        status = server.get_json("/elastic_ft/status")
        if status.get("serving") and rank not in status["live_ranks"]:
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError(f"the group did not serve without rank {rank} in {timeout_s}s")


def run_cycle(server: VLLMServer, cycle: int, rank: int, requests: int, concurrency: int) -> dict:
    pid = faults.find_rank_processes(server.proc.pid)[rank]["worker"]
    faults.signal_process("kill", pid, rank)
    killed = time.monotonic()
    record: dict = {"bench": "replace_cycles", "cycle": cycle, "rank": rank}
    if cycle == 0:  # nothing ran yet: the first request must be served all the same
        complete_once(server.url, PROMPTS[0], 8, 120)
        record["first_request_after_kill_s"] = round(time.monotonic() - killed, 3)
    record["serving_without_s"] = round(_serving_without(server, rank, 60), 3)
    loads = []
    load = threading.Thread(target=lambda: loads.append(run_load(
        server.url, PROMPTS, requests, concurrency, max_tokens=16, timeout_s=180,
        progress_every_s=None)))
    load.start()
    time.sleep(1.0)  # requests are running on the survivors
    code, answer = server.post_json("/elastic_ft/replace", {"rank": rank})
    load.join()
    record.update(replace_status=code, admitted=code == 200 and rank in answer.get("members", []),
                  engine_start_s=answer.get("start_s"), admission_s=answer.get("admit_s"),
                  error=answer.get("error"), requests_ok=loads[0].ok,
                  requests_failed=loads[0].failed)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 3, 0, 2, 1, 0],
                        help="the rank lost (and replaced) in each cycle")
    parser.add_argument("--cycles", type=int, default=None,
                        help="cycles to run, going round --ranks (default: one per rank given)")
    parser.add_argument("--requests", type=int, default=24, help="per cycle")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    args = parser.parse_args()
    if any(not 0 <= r < args.dp for r in args.ranks):
        parser.error(f"--ranks: each must be in [0, {args.dp - 1}]")
    args.out.mkdir(parents=True, exist_ok=True)
    ranks = [args.ranks[i % len(args.ranks)] for i in range(args.cycles or len(args.ranks))]
    spec = ServerSpec(str(build_tiny_moe()), data_parallel_size=args.dp, expert_parallel=True,
                      extra_args=["--elastic-ft-deadline-s", "2",
                                  "--elastic-ft-rebuild-budget-s", "20"])
    records, samples = [], []
    with VLLMServer(spec, args.out / "replace_cycles_server.log") as server:
        server.wait_ready()
        for cycle, rank in enumerate(ranks):
            print(f"[replace_cycles] cycle {cycle + 1}/{len(ranks)}: rank {rank}",
                  flush=True)
            record = run_cycle(server, cycle, rank, args.requests, args.concurrency)
            samples.append(resources(server.proc.pid))
            record["processes"] = len(samples[-1])
            record["threads_total"] = sum(p["threads"] for p in samples[-1].values())
            # The processes that have lived through every cycle so far, this cycle.
            record["survivors"] = {f"{samples[0][p]['name']}:{p}": {
                k: samples[-1][p][k] for k in RESOURCES}
                for p in samples[0] if p in samples[-1]}
            records.append(record)
            print(json.dumps(record), flush=True)
            if not record["admitted"]:
                break
    admitted = [r for r in records if r["admitted"]]
    summary = {
        "bench": "replace_cycles_summary", "dp": args.dp, "cycles": len(ranks),
        "admitted": len(admitted),
        "requests_ok": sum(r["requests_ok"] for r in records),
        "requests_failed": sum(r["requests_failed"] for r in records),
        "admission_s_median": round(statistics.median(r["admission_s"] for r in admitted), 3)
        if admitted else None,
        "engine_start_s_median": round(statistics.median(r["engine_start_s"] for r in admitted),
                                       1) if admitted else None,
        "first_request_after_kill_s": records[0].get("first_request_after_kill_s")
        if records else None,
        # After the first cycle (every process of the deployment has been through one fault)
        # to after the last, in the processes that lived through all of them.
        "resource_growth": growth(samples[0], samples[-1]) if len(samples) > 1 else None,
        "drift": drift_per_cycle(samples) if len(samples) > 1 else None,
    }
    print(json.dumps(summary), flush=True)
    _print_table(records)
    (args.out / "replace_cycles.json").write_text(json.dumps(
        {"cycles": records, "summary": summary}, indent=2))
    return 0 if len(admitted) == len(ranks) and summary["requests_failed"] == 0 else 1


def _print_table(records: list[dict]) -> None:
    """Per cycle, each surviving process's threads / fds / RSS."""
    names = list(records[0].get("survivors", {})) if records else []
    print("cycle | " + " | ".join(f"{n} thr/fds/RSS MiB" for n in names))
    for record in records:
        cells = [record.get("survivors", {}).get(n) for n in names]
        print(f"{record['cycle']:5d} | " + " | ".join(
            f"{c['threads']}/{c['fds']}/{c['rss_mib']}" if c else "-" for c in cells))


if __name__ == "__main__":
    raise SystemExit(main())
