"""The main job for now: a real DP+EP deployment loses a rank, and the watchdog names it.

Starts ``vllm-elastic-ft serve`` (DP=2, EP on, tiny MoE, plugin on), drives a
bounded closed-loop load, kills (or stops) one rank's worker in the middle of
it, and shows what happened: the watchdog's FaultReport (who, what, how fast)
what the API server showed (``/elastic_ft/status``, ``/health``) and what the
requests saw. In-engine recovery is not wired into vLLM yet, so after the
report stock vLLM still shuts the deployment down and the requests in flight
fail: the demo says so in its numbers.

Writes ``timeline.txt``, ``result.json`` and ``timeline.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from vllm_elastic_ft import faults
from vllm_elastic_ft.loadgen import RequestRecord, run_load
from vllm_elastic_ft.reports_in_logs import fault_reports
from vllm_elastic_ft.testing.server import ServerSpec, VLLMServer

PROMPTS = ["The quick brown fox", "Wide expert parallel serving", "0 1 2 3 4 5",
           "def f(x): return", "When one rank dies or hangs", "Questions and answers"]


def _wait_for_report(server: VLLMServer, suspect: int, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for report in fault_reports(server.log_text()):
            if suspect in report["suspects"]:
                return report
        time.sleep(0.1)
    return None


def _follow_status(server: VLLMServer, events: list[tuple[float, str]], stop: threading.Event) -> None:
    """Record every change of the group state the API server shows, and of /health."""
    last_state, last_health = None, None
    while not stop.is_set():
        try:
            state = server.get_json("/elastic_ft/status", timeout_s=1)["state"]
        except (OSError, ValueError, KeyError):
            state = "unreachable"
        health = server.health()
        if state != last_state or health != last_health:
            events.append((time.time(), f"API server: group {state}, /health {health}"))
            last_state, last_health = state, health
        stop.wait(0.05)


def _plot(path: Path, t0: float, t0_mono: float, records: list[RequestRecord],
          events: list[tuple[float, str]]) -> None:
    """Requests finished per 0.5 s (records carry monotonic times, events wall times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends = [r.end - t0_mono for r in records]
    horizon = max(ends + [e[0] - t0 for e in events] + [1.0])
    width = max(0.1, round(horizon / 40, 1))  # about 40 bars whatever the run's length
    bins = [i * width for i in range(int(horizon / width) + 2)]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.hist([r.end - t0_mono for r in records if r.ok], bins=bins, color="tab:green", label="ok")
    ax.hist([r.end - t0_mono for r in records if not r.ok], bins=bins, color="tab:red",
            label="failed")
    for t, label in events:
        ax.axvline(t - t0, color="k", ls="--", lw=0.8)
        ax.text(t - t0, ax.get_ylim()[1] * 0.95, label, rotation=90, va="top", fontsize=8)
    ax.set_xlabel("seconds since load start")
    ax.set_ylabel(f"requests finished / {width:g} s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args: argparse.Namespace, model: str) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ServerSpec(model, data_parallel_size=args.dp, expert_parallel=True,
                      extra_args=["--elastic-ft-deadline-s", str(args.deadline_s)])
    events: list[tuple[float, str]] = []
    print(f"[demo] starting DP={args.dp} EP server with vllm-elastic-ft (log: {out / 'server.log'})")
    with VLLMServer(spec, out / "server.log") as server:
        startup_s = server.wait_ready(timeout_s=600)
        print(f"[demo] ready in {startup_s:.0f}s; load: {args.requests} requests, "
              f"{args.concurrency} in flight")
        done = []
        trigger_at = max(1, args.requests // 3)
        fault_fired = threading.Event()
        injection: list[faults.Injection] = []

        def on_record(record: RequestRecord) -> None:
            done.append(record)
            if len(done) >= trigger_at and not fault_fired.is_set():
                fault_fired.set()
                pid = faults.rank_pid(server.proc.pid, args.fault_rank, args.role)
                injection.append(faults.signal_process(args.fault, pid, args.fault_rank))
                print(f"[demo] {args.fault} -> {args.role} of DP rank {args.fault_rank} (pid {pid})")

        t0, t0_mono = time.time(), time.monotonic()
        stop_following = threading.Event()
        follower = threading.Thread(target=_follow_status, args=(server, events, stop_following),
                                    daemon=True)
        follower.start()
        load = run_load(server.url, PROMPTS, args.requests, args.concurrency, max_tokens=32,
                        timeout_s=120, on_record=on_record, progress_every_s=5)
        report = _wait_for_report(server, args.fault_rank, 10) if injection else None
        stop_following.set()
        follower.join(timeout=5)
        if args.fault == "stop" and injection:
            faults.signal_process("cont", injection[0].pid, args.fault_rank)
    events.append((t0, "load start"))
    result = {
        "dp": args.dp,
        "fault": args.fault,
        "fault_rank": args.fault_rank,
        "role": args.role,
        "startup_s": round(startup_s, 1),
        "requests_sent": len(load.records),
        "requests_ok": load.ok,
        "requests_failed": load.failed,
        "detected": report is not None,
        "detect_s": None,
        "report": report,
        "note": "the API server fences the group (503s); in-engine recovery is not wired "
                "into vLLM yet, so stock vLLM then shuts every engine down and in-flight "
                "requests fail",
    }
    if injection:
        events.append((injection[0].at, f"{args.fault} rank {args.fault_rank}"))
    if report is not None and injection:
        result["detect_s"] = round(report["detected_at"] - injection[0].at, 3)
        events.append((report["detected_at"], f"FaultReport by rank {report['reporter']}"))
    lines = [f"{t - t0:8.3f}s  {label}" for t, label in sorted(events)]
    lines += [f"requests: {load.ok} ok, {load.failed} failed of {len(load.records)}"]
    if report:
        lines.append(f"report: suspects={report['suspects']} kind={report['kind']} "
                     f"trigger={report['trigger']} reason={report['reason']}")
    (out / "timeline.txt").write_text("\n".join(lines) + "\n")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(out / "timeline.png", t0, t0_mono, load.records, events)
    print("\n".join(["[demo] timeline:"] + ["  " + line for line in lines]))
    print(json.dumps({k: v for k, v in result.items() if k != "report"}))
    print(f"[demo] wrote {out}/timeline.txt, result.json, timeline.png")
    return 0 if report is not None else 1
