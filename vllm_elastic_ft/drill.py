"""The failure drill: a real DP+EP deployment loses a rank under load, and comes back.

``vllm-elastic-ft drill`` (``./run.sh``) starts a local deployment
(``vllm-elastic-ft serve``: DP ranks, EP on, the tiny MoE, the plugin on),
takes reference greedy outputs, drives a bounded closed-loop load through a
client that retries like an ingress, injects a fault into one rank's worker or
engine (kill or stop), and plays the orchestrator: it follows
``/elastic_ft/status`` and restarts the group when the group cannot heal
itself. It then checks the outputs against the reference and writes
``timeline.txt``, ``timeline.png`` and ``result.json`` (``detect_s``,
``fence_s``, ``rebuild_s``, ``interruption_s``, ``requests_sent``,
``requests_ok``, ``requests_lost``, ``outputs_match_reference``,
``final_state``, ``live_ranks``...).

Recovery is in-engine (``"recovery": "in_engine"``): the survivors rebuild
the group and carry on; the orchestrator restarts the group only when it
cannot heal (``"group_restart"``). ``--second-fault-rank`` kills another rank
while the survivors rebuild (they are held in the rebuild by an injected
delay); with ``--fault stop`` the stopped rank is woken (SIGCONT) once the group
rebuilt without it, to show that it is refused. ``--baseline`` runs the same
load and fault again with in-engine rebuild off (the group restart an
orchestrator does today) and the deployment on stock vLLM, and reports the
interruption ratio.

``--nodes N`` runs the same drill with the ranks over N simulated nodes
(``testing/nodes.py``: network and PID namespaces, vLLM's own multi-node DP
with its headless launcher on the secondary nodes); ``--fault partition``
takes the fault rank's node off the network (its processes live on) and
brings it back once the group serves; ``--rejoin`` then replaces the lost
ranks on their own node (its launcher is the node agent).
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from pathlib import Path

from vllm_elastic_ft import faults
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.loadgen import LoadSummary, RequestRecord, run_load
from vllm_elastic_ft.reports_in_logs import fault_reports
from vllm_elastic_ft.testing.harness import free_port
from vllm_elastic_ft.testing.server import ServerFailed, ServerSpec, VLLMServer

PROMPTS = ["The quick brown fox", "Wide expert parallel serving", "0 1 2 3 4 5",
           "def f(x): return", "When one rank dies or hangs", "Questions and answers"]
REFERENCE_TOKENS = 16
#: Timeline events marked on the plot, with their short labels (the rest is in timeline.txt).
_PLOTTED = (("fault:", "fault"), ("group event: Fault -> FENCED", "fenced"),
            ("group event: PeerFenced -> FENCED", "fenced"),
            ("group event: RebuildDone -> READY", "ready"),
            ("group event: Served -> HEALTHY", "serving"),
            ("orchestrator: group restart", "group restart"),
            ("orchestrator: group READY", "ready after restart"),
            ("rejoin: replacement", "replacement asked"), ("rejoin: DP rank", "rejoined"))


class Timeline:
    """Wall-clock events of the drill, in the order they happened."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def add(self, what: str, at: float | None = None) -> float:
        at = time.time() if at is None else at
        with self._lock:
            self.events.append((at, what))
        print(f"[drill] {what}", flush=True)
        return at

    def first(self, prefix: str) -> float | None:
        return min((t for t, what in self.events if what.startswith(prefix)), default=None)


class Deployment:
    """The group under test: one server process, restarted in place (same port)."""

    def __init__(self, spec: ServerSpec, out: Path):
        self.spec, self.out = spec, out
        self.port = free_port()
        self.starts = 0
        self.server: VLLMServer | None = None

    def start(self) -> float:
        self.starts += 1
        self.server = VLLMServer(self.spec, self.out / f"server-{self.starts}.log", self.port)
        self.server.start()
        return self.server.wait_ready(timeout_s=900)

    def restart(self) -> float:
        if self.server is not None:
            self.server.stop()
        return self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict | None:
        try:
            return self.server.get_json("/elastic_ft/status", timeout_s=1)
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        return self.server is not None and self.server.proc.poll() is None

    def stop(self) -> None:
        self.server.stop()

    def rank_pid(self, rank: int, role: str) -> int:
        return faults.rank_pid(self.server.proc.pid, rank, role)

    def first_log_text(self) -> str:
        """The logs of the first start (where the fault happened)."""
        return (self.out / "server-1.log").read_text(errors="replace")


class NodesDeployment(Deployment):
    """The group over ``nodes`` simulated nodes (``testing/nodes.py``), ``dp / nodes`` ranks
    each: vLLM's API server on node 0, vLLM's headless launcher on the others."""

    def __init__(self, spec: ServerSpec, out: Path, nodes: int):
        super().__init__(spec, out)
        from vllm_elastic_ft.testing.nodes import SimulatedNodes

        self.nodes = SimulatedNodes(nodes)
        self.ranks_per_node = spec.data_parallel_size // nodes
        self.group = None

    def start(self) -> float:
        from vllm_elastic_ft.testing.multinode import MultiNodeServer

        if self.starts == 0:
            self.nodes.__enter__()
        self.starts += 1
        self.group = MultiNodeServer(self.nodes, self.spec, self.ranks_per_node,
                                     self.out / f"start-{self.starts}").start()
        self.server = self.group.head
        return self.group.wait_ready(900)

    def restart(self) -> float:
        self.group.stop()
        for index in range(1, len(self.nodes.nodes)):
            self.nodes.heal(index)  # an orchestrator's restart gets working machines
        return self.start()

    @property
    def url(self) -> str:
        return self.group.url

    def stop(self) -> None:
        try:
            if self.group is not None:
                self.group.stop()
        finally:
            self.nodes.__exit__(None, None, None)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def rank_pid(self, rank: int, role: str) -> int:
        return faults.rank_pid(self.group.root_pid(self.node_of(rank)), rank, role)

    def first_log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted((self.out / "start-1").glob("*.log")))


def _follow(deployment: Deployment, timeline: Timeline, stop: threading.Event,
            on_state=None) -> None:
    """Record every change of what the API server says about its group."""
    last = None
    while not stop.is_set():
        status = deployment.status()
        state = status["state"] if status else "unreachable"
        seen = (state, status["epoch"] if status else None,
                deployment.server.health() if status else None)
        if seen != last:
            epoch = f" epoch {status['epoch']}, ranks {status['live_ranks']}," if status else ""
            timeline.add(f"API server: group {state},{epoch} /health {seen[2]}")
            last = seen
            if on_state is not None:
                on_state(state)
        stop.wait(0.02)


def _orchestrate(deployment: Deployment, timeline: Timeline, fault_at: threading.Event,
                 load_done: threading.Event, budget_s: float) -> None:
    """Restart the group when it cannot heal itself: its process went down, it
    reported FAILED, or it stayed fenced past ``budget_s``."""
    fault_at.wait()
    not_serving_since: float | None = None
    while not load_done.is_set():
        status = deployment.status()
        state = status["state"] if status else None
        if state == "HEALTHY":
            not_serving_since = None
        elif state is not None and not_serving_since is None:
            not_serving_since = time.time()
        failed = state == "FAILED"
        over_budget = not_serving_since is not None and time.time() - not_serving_since > budget_s
        if not deployment.alive() or failed or over_budget:
            why = ("the deployment went down" if not deployment.alive() else
                   "the group reported FAILED" if failed else f"not serving for > {budget_s}s")
            timeline.add(f"orchestrator: group restart ({why})")
            took = deployment.restart()
            timeline.add(f"orchestrator: group READY again after restart ({took:.0f}s start-up)")
            return
        time.sleep(0.1)


def _rejoin(deployment: Deployment, timeline: Timeline, ranks: list[int], out: dict) -> None:
    """Replace lost DP ``ranks`` through the API server, one after the other, and record how
    it went in ``out``. A rank whose old engine still runs on its node (a cut-off engine
    exits once its link is back and it meets its fence) is asked again, for up to 120 s."""
    out["ranks"] = {}
    for rank in ranks:
        timeline.add(f"rejoin: replacement for DP rank {rank} requested "
                     "(POST /elastic_ft/replace)")
        deadline = time.monotonic() + 120
        while True:
            code, answer = deployment.server.post_json("/elastic_ft/replace", {"rank": rank})
            if code == 200 or "still running" not in answer.get("error", "") \
                    or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        out["admitted_at"] = time.time()
        if code != 200:
            out["error"] = answer.get("error", f"HTTP {code}")
            timeline.add(f"rejoin: failed ({out['error']})")
            return
        out["ranks"][rank] = {k: answer.get(k) for k in ("start_s", "admit_s", "node")}
        out.update(admitted=len(out["ranks"]) == len(ranks), start_s=answer["start_s"],
                   admit_s=answer["admit_s"], members=answer["members"])
        where = f" on {answer['node']}" if answer.get("node") else ""
        timeline.add(f"rejoin: DP rank {rank} admitted{where}, members {answer['members']} "
                     f"(engine up in {answer['start_s']:.1f}s, pause+admit+resume "
                     f"{answer['admit_s']:.2f}s)")


def _stale_rank_refused(log_text: str, rank: int) -> bool:
    """Whether the faulty rank, back from its stop, refused to talk at its stale epoch: its
    own FencedError line (``group/fencing.py``), with its epoch behind the group's."""
    pattern = (rf"group dp rank {rank}: fenced out \(own epoch (\d+), group epoch (\d+)\); "
               "refusing to communicate")
    return any(int(own) < int(group) for own, group in re.findall(pattern, log_text))


def _interruption_s(load: LoadSummary, fault_wall: float, t0_wall: float, t0_mono: float) -> float:
    """Longest gap between successful completions after the fault (0: none)."""
    fault_mono = t0_mono + (fault_wall - t0_wall)
    ends = sorted([fault_mono] + [r.end for r in load.records if r.ok and r.end >= fault_mono])
    return max((b - a for a, b in zip(ends, ends[1:])), default=0.0)


def _plot(path: Path, t0: float, t0_mono: float, records: list[RequestRecord],
          events: list[tuple[float, str]]) -> None:
    """Requests finished per bar (records carry monotonic times, events wall times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends = [r.end - t0_mono for r in records]
    horizon = max(ends + [e[0] - t0 for e in events] + [1.0])
    width = max(0.1, round(horizon / 60, 1))  # about 60 bars whatever the run's length
    bins = [i * width for i in range(int(horizon / width) + 2)]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.hist([r.end - t0_mono for r in records if r.ok], bins=bins, color="tab:green",
            label="completed")
    ax.hist([r.end - t0_mono for r in records if not r.ok], bins=bins, color="tab:red",
            label="lost")
    top = ax.get_ylim()[1]
    shown = [(t, short) for t, what in sorted(events) for prefix, short in _PLOTTED
             if what.startswith(prefix)]
    for i, (t, short) in enumerate(shown):
        ax.axvline(t - t0, color="k", ls="--", lw=0.7)
        ax.text(t - t0, top * (0.95 - 0.09 * (i % 6)), f" {short}", va="top", fontsize=8)
    ax.set_xlabel("seconds since load start")
    ax.set_ylabel(f"requests completed / {width:g} s")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stock_baseline(args: argparse.Namespace, model: str, out: Path) -> dict:
    """The same deployment and one request on stock vLLM (no plugin)."""
    spec = ServerSpec(model, data_parallel_size=args.dp, expert_parallel=True, plugin=False)
    server = VLLMServer(spec, out / "stock.log")
    result: dict = {"plugin": False, "dp": args.dp}
    try:
        with server:
            result["startup_s"] = round(server.wait_ready(timeout_s=600), 1)
            try:
                server.greedy_tokens(PROMPTS[0], 4, timeout_s=60)
                result["serves"] = True
            except OSError as err:
                result.update(serves=False, error=str(err)[:200])
    except ServerFailed as err:
        result.update(serves=False, error=str(err).splitlines()[0][:200])
    text = server.log_text()
    result["not_implemented_error"] = "NotImplementedError" in text
    return result


def _drill_once(args: argparse.Namespace, model: str, out: Path, in_engine: bool,
                label: str) -> dict:
    """One deployment, one bounded load, one fault (and a second one if asked); the result."""
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--elastic-ft-deadline-s", str(args.deadline_s),
             "--elastic-ft-rebuild-budget-s", str(args.rebuild_budget_s)]
    if not in_engine:
        extra += ["--no-elastic-ft-in-engine-rebuild"]
    if args.fault == "slow" or args.second_fault_rank is not None:
        extra += ["--elastic-ft-fault-injection"]  # store knobs: off unless a drill asks
    spec = ServerSpec(model, data_parallel_size=args.dp, expert_parallel=True, extra_args=extra)
    deployment = (NodesDeployment(spec, out, args.nodes) if args.nodes > 1
                  else Deployment(spec, out))
    timeline = Timeline()
    where = f" over {args.nodes} simulated nodes" if args.nodes > 1 else ""
    print(f"[drill] {label}: starting DP={args.dp} EP deployment{where} (logs in {out})")
    startup_s = deployment.start()
    injection: list[faults.Injection] = []
    try:
        reference = [deployment.server.greedy_tokens(p, REFERENCE_TOKENS) for p in PROMPTS]
        timeline.add(f"deployment ready in {startup_s:.0f}s; reference outputs taken")
        store_address = deployment.server.store  # the harness chose it (status never shows it)
        if args.second_fault_rank is not None and store_address:
            # Hold the survivors inside their rebuild long enough for the second fault to land.
            faults.set_rebuild_delay(connect_store(store_address), "dp", args.rebuild_hold_s)
            timeline.add(f"injected: rebuilds held {args.rebuild_hold_s}s (second fault lands in one)")
        fault_fired, load_done, stop_following = (threading.Event() for _ in range(3))
        rejoin: dict = {}
        lost_ranks = (deployment.group.ranks_on(deployment.node_of(args.fault_rank))
                      if args.fault == "partition" else [args.fault_rank])
        rejoin_thread = threading.Thread(target=_rejoin, args=(deployment, timeline,
                                                                lost_ranks, rejoin),
                                         daemon=True)
        trigger_at = max(1, args.requests // 3)
        done_count = [0]

        def inject(kind: str, rank: int, note: str = "") -> None:
            if kind == "slow":
                injection.append(faults.set_slow(connect_store(store_address), "dp", rank,
                                                 args.slow_delay_s))
                timeline.add(f"fault: slow DP rank {rank} by {args.slow_delay_s}s per "
                             f"dispatch/combine{note}", injection[-1].at)
                return
            if kind == "partition":
                node = deployment.node_of(rank)
                deployment.nodes.cut(node)
                injection.append(faults.Injection("partition", None, rank, time.time()))
                timeline.add(f"fault: partition: node {node}'s link down (DP ranks "
                             f"{deployment.group.ranks_on(node)} live on, unreachable){note}",
                             injection[-1].at)
                return
            pid = deployment.rank_pid(rank, args.role)
            injection.append(faults.signal_process(kind, pid, rank))
            where = f" on node {deployment.node_of(rank)}" if args.nodes > 1 else ""
            timeline.add(f"fault: {kind} {args.role} of DP rank {rank}{where} (pid {pid}){note}",
                         injection[-1].at)

        def on_record(record: RequestRecord) -> None:
            done_count[0] += 1
            if done_count[0] >= trigger_at and not fault_fired.is_set():
                fault_fired.set()
                inject(args.fault, args.fault_rank)

        def on_state(state: str) -> None:
            """Faults that follow the group's state: SIGCONT of a stopped rank once the group
            rebuilt without it (it wakes up stale); a second kill while the group rebuilds."""
            if (state == "REBUILDING" and args.second_fault_rank is not None
                    and len(injection) == 1):
                inject("kill", args.second_fault_rank, " during the rebuild")
            if (state == "HEALTHY" and args.rejoin and injection and deployment.starts == 1
                    and not rejoin_thread.is_alive() and not rejoin):
                rejoin["requested_at"] = time.time()
                rejoin_thread.start()
            if (state in ("READY", "HEALTHY") and args.fault == "stop" and injection
                    and not any(i.kind == "cont" for i in injection) and deployment.starts == 1):
                injection.append(faults.signal_process("cont", injection[0].pid, args.fault_rank))
                timeline.add(f"fault: cont rank {args.fault_rank} (it wakes up in an old epoch)",
                             injection[-1].at)
            if (state == "HEALTHY" and args.fault == "partition" and injection
                    and not any(i.kind == "heal" for i in injection) and deployment.starts == 1):
                node = deployment.node_of(args.fault_rank)
                deployment.nodes.heal(node)
                injection.append(faults.Injection("heal", None, args.fault_rank, time.time()))
                timeline.add(f"fault: partition healed: node {node}'s link up (its ranks are "
                             "at an old epoch)", injection[-1].at)

        threads = [
            threading.Thread(target=_follow, args=(deployment, timeline, stop_following, on_state),
                             daemon=True),
            threading.Thread(target=_orchestrate, args=(deployment, timeline, fault_fired, load_done,
                                                        args.rebuild_budget_s), daemon=True),
        ]
        for t in threads:
            t.start()
        t0, t0_mono = timeline.add(f"load: {args.requests} requests, {args.concurrency} in flight, "
                                   f"{_streams(args.stream_every)}, 503s retried "
                                   f"for up to {args.retry_for_s:.0f}s"), time.monotonic()
        load = run_load(deployment.url, PROMPTS, args.requests, args.concurrency, max_tokens=32,
                        timeout_s=120, on_record=on_record, progress_every_s=10,
                        retry_for_s=args.retry_for_s, stream_every=args.stream_every)
        load_done.set()
        threads[1].join(timeout=900)
        if rejoin:
            rejoin_thread.join(timeout=600)
        if args.fault == "stop" and injection and not any(i.kind == "cont" for i in injection) \
                and deployment.starts == 1:
            faults.signal_process("cont", injection[0].pid, args.fault_rank)
        if args.fault == "slow" and store_address and deployment.starts == 1:
            faults.set_slow(connect_store(store_address), "dp", args.fault_rank, 0.0)
        after = [deployment.server.greedy_tokens(p, REFERENCE_TOKENS) for p in PROMPTS]
        time.sleep(0.5)  # let a woken stale rank meet its fence before the final look
        final = deployment.status() or {}
        if deployment.starts == 1:
            # The API server's own transitions, timestamped where they happened
            # (a poll can miss a state that lasts a few milliseconds).
            for event in final.get("events", []):
                if event["event"] != "start":
                    timeline.add(f"group event: {event['event']} -> {event['state']} (epoch "
                                 f"{event['epoch']}, ranks {event['live_ranks']}): "
                                 f"{event['reason']}", event["t"])
        stop_following.set()
        threads[0].join(timeout=5)
        log_text = deployment.first_log_text()
        # The first report naming a lost rank (a partition loses the fault rank's whole
        # node; each node's log is in its own file, so by time, not log order).
        report = min((r for r in fault_reports(log_text) if set(r["suspects"]) & set(lost_ranks)),
                     key=lambda r: r["detected_at"], default=None)
    finally:
        deployment.stop()

    fault_wall = injection[0].at if injection else None

    def since_fault(at: float | None) -> float | None:
        return round(at - fault_wall, 3) if at is not None and fault_wall is not None else None

    restarted = deployment.starts > 1
    fenced_at = min(filter(None, (timeline.first("group event: Fault -> FENCED"),
                                  timeline.first("group event: PeerFenced -> FENCED"),
                                  timeline.first("API server: group FENCED"))), default=None)

    def first_after(prefix: str) -> float | None:
        return next((t for t, what in sorted(timeline.events)
                     if fenced_at is not None and t >= fenced_at and what.startswith(prefix)), None)

    ready_in_engine = None if restarted else first_after("group event: RebuildDone -> READY")
    serving_again = None if restarted else first_after("group event: Served -> HEALTHY")
    result = {
        "label": label, "dp": args.dp, "nodes": args.nodes, "fault": args.fault,
        "fault_rank": args.fault_rank,
        "second_fault_rank": args.second_fault_rank, "role": args.role,
        "recovery": "group_restart" if restarted else "in_engine" if ready_in_engine else "none",
        "detect_s": since_fault(report["detected_at"]) if report else None,
        "fence_s": since_fault(fenced_at),
        "rebuild_s": since_fault(timeline.first("orchestrator: group READY") if restarted
                                 else ready_in_engine),
        "serving_again_s": since_fault(timeline.first("orchestrator: group READY") if restarted
                                       else serving_again),
        "interruption_s": round(_interruption_s(load, fault_wall, t0, t0_mono), 3) if fault_wall else None,
        "requests_sent": len(load.records), "requests_ok": load.ok, "requests_lost": load.failed,
        "requests_retried": sum(r.attempts > 1 for r in load.records),
        "requests_resubmitted_in_engine": ((final.get("recovery") or {}).get("requests_resubmitted")),
        "outputs_match_reference": after == reference,
        "final_state": final.get("state"), "final_epoch": final.get("epoch"),
        "live_ranks": final.get("live_ranks"), "expert_placement": final.get("expert_placement"),
        "stale_rank_refused": any(_stale_rank_refused(log_text, r) for r in lost_ranks)
        if args.fault in ("stop", "slow", "partition") else None,
        "rejoin": ({"admitted": rejoin.get("admitted", False),
                    "admitted_s": since_fault(rejoin.get("admitted_at")),
                    "engine_start_s": rejoin.get("start_s"), "admission_s": rejoin.get("admit_s"),
                    "members": rejoin.get("members"), "error": rejoin.get("error"),
                    "ranks": rejoin.get("ranks")}
                   if args.rejoin else None),
        "startup_s": round(startup_s, 1), "report": report,
    }
    lines = [f"{t - t0:9.3f}s  {what}" for t, what in sorted(timeline.events)]
    (out / "timeline.txt").write_text("\n".join(lines) + "\n")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(out / "timeline.png", t0, t0_mono, load.records, timeline.events)
    print("\n".join([f"[drill] {label} timeline (seconds since load start):"]
                    + ["  " + x for x in lines]))
    return result


def _streams(every: int) -> str:
    return f"every {every}-th streamed" if every > 0 else "none streamed"


def check_drill_args(args: argparse.Namespace) -> None:
    """Refuse a drill that cannot run, naming the flag (before any model is built)."""
    if args.stream_every < 0:
        raise SystemExit(f"drill: --stream-every must be >= 0, got {args.stream_every}")
    nodes = getattr(args, "nodes", 1)
    if nodes < 1 or args.dp % nodes:
        raise SystemExit(f"drill: --nodes must be >= 1 and divide --dp ({args.dp}), got {nodes}")
    if nodes > 1:
        from vllm_elastic_ft.testing.nodes import unavailable

        why = unavailable()
        if why:
            raise SystemExit(f"drill: --nodes {nodes}: {why}")
    if not 0 <= args.fault_rank < args.dp:
        raise SystemExit(f"drill: --fault-rank must be in 0..{args.dp - 1}, got {args.fault_rank}")
    if args.fault == "partition":
        if nodes < 2:
            raise SystemExit("drill: --fault partition needs --nodes 2 or more")
        if args.fault_rank < args.dp // nodes:
            raise SystemExit(f"drill: --fault partition cuts the fault rank's node off; the "
                             f"head node (ranks 0..{args.dp // nodes - 1}) hosts the front end "
                             f"and the store: pick --fault-rank >= {args.dp // nodes}")
        if args.baseline:
            raise SystemExit("drill: --baseline is not available with --fault partition")


def run_drill(args: argparse.Namespace, model: str) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = _drill_once(args, model, out, in_engine=True, label="vllm-elastic-ft")
    if args.baseline:
        print("[drill] baseline 1/2: the same load and fault, recovered by restarting the group")
        restart = _drill_once(args, model, out / "baseline-group-restart", in_engine=False,
                              label="group restart")
        print("[drill] baseline 2/2: the same deployment on stock vLLM (no plugin)")
        stock = _stock_baseline(args, model, out)
        ours, theirs = result["interruption_s"], restart["interruption_s"]
        result["baseline"] = {
            "stock_vllm": stock,
            "group_restart": {k: restart[k] for k in (
                "recovery", "rebuild_s", "interruption_s", "requests_lost", "requests_retried",
                "outputs_match_reference", "final_state")},
            "interruption_ratio": round(theirs / ours, 1) if ours and theirs else None,
        }
        (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "report"}))
    print(f"[drill] wrote {out}/timeline.txt, timeline.png, result.json")
    return 0 if result["requests_lost"] == 0 and result["outputs_match_reference"] else 1
