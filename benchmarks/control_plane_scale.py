#!/usr/bin/env python
"""Width: the control plane (watchdog + fencing + agreement, no model) at 8..64 real rank
processes and 128 emulated ranks, one rank killed and, separately, a whole host of 8.

Every rank is the product's own ``RankWatchdog`` and ``GroupMember``
(``vllm_elastic_ft/testing/control_plane.py``) on a counting client of one
TCPStore, hosted in its own process (as the front end hosts it). Ranks are
grouped 8 per virtual host: a rank probes ``/proc`` only for peers of its own
virtual host and judges the others by heartbeat staleness, as on a cluster.

* **real** rows: one OS process per rank; a kill is a SIGKILL of the rank's process
  (8: every process of virtual host 1).
* **emulated** rows: the ranks of one virtual host are threads of one process
  (same code, one interpreter), to reach 128 ranks on a small machine; killing
  one rank stops its watchdog without a goodbye (as a process on another host
  that stopped: named by staleness); killing 8 is a SIGKILL of the process
  hosting virtual host 1.

Per case it measures a steady window (every rank beating, nobody dead): store
requests per second summed over the ranks' clients, keys named per second, the
store process's CPU (fraction of one core, psutil) and the heartbeat gaps; then
the kill and the recovery:

* ``detect_p50_s`` / ``detect_p99_s``: kill -> each survivor knew (its own
  FaultReport naming a victim, or its watchdog read the fence, whichever first);
* ``agree_s``: kill -> the members of the new epoch were published;
* ``ready_s``: fence (the epoch's compare-and-set) -> the last survivor READY
  (``ready_p50_s``: the median survivor);
* ``false_verdicts``: reports naming a rank that was not killed, or anything
  reported after the rebuild.

    python benchmarks/control_plane_scale.py --ranks 8 16 32 64 --emulated 128 \\
        --peer-reads per_peer batched --out runs/s16-scale/scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group.fencing import current_epoch
from vllm_elastic_ft.testing import control_plane as cp
from vllm_elastic_ft.watchdog.rank_watchdog import WatchdogSettings


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..100) of ``values``, or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _r(value, digits: int = 3):
    return None if value is None else round(value, digits)


def _beat_share(beats: list[int], window: float, spec) -> float | None:
    """The survivors' beats in the window as a share of 1/heartbeat_interval_s each."""
    if not beats or not window:
        return None
    return sum(beats) / len(beats) / window * spec.settings.heartbeat_interval_s


def _store_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class Case:
    """One run: start the store and the ranks, measure, kill, measure, tear down."""

    def __init__(self, ctx, spec: cp.ControlPlaneSpec, emulated: bool, kill: int, args):
        self.ctx, self.spec, self.emulated, self.kill_count, self.args = (
            ctx, spec, emulated, kill, args)
        world, per_host = spec.world, spec.ranks_per_host or spec.world
        self.layout = ([list(range(h, min(h + per_host, world))) for h in range(0, world, per_host)]
                       if emulated else [[r] for r in range(world)])
        host = 1 if world > per_host else 0
        first = host * per_host
        self.victims = (list(range(first, min(first + kill, world))) if kill > 1
                        else [first + min(3, per_host - 1, world - 1 - first)])
        self.procs: list = []
        self.store_proc = None

    # ------------------------------------------------------------ running
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self._teardown()

    def _run(self) -> dict:
        ctx, spec, args = self.ctx, self.spec, self.args
        conn, child = ctx.Pipe()
        self.store_proc = ctx.Process(target=cp.host_store, args=(child, os.getpid()),
                                      daemon=True)
        self.store_proc.start()
        self._store_conn = conn
        if not conn.poll(60):
            raise TimeoutError("the store process did not start")
        address = f"127.0.0.1:{conn.recv()}"
        observer = connect_store(address, timeout_s=30)
        store_ps = psutil.Process(self.store_proc.pid)
        counts = ctx.RawArray("q", cp.counter_slots(spec.world))
        kill_flags = ctx.RawArray("b", spec.world)
        up = ctx.RawArray("b", spec.world)
        self._stop = stop = ctx.RawArray("b", 1)
        self._results = results = ctx.Queue()
        t_start = time.time()
        for ranks in self.layout:
            p = ctx.Process(target=cp.run_ranks_process, daemon=True,
                            args=(ranks, spec, address, counts, kill_flags, up, stop, results,
                                  os.getpid()))
            p.start()
            self.procs.append((ranks, p))
            # An emulated process opens all its ranks' connections at once: one process
            # at a time (128 connections in the same instant back up the store's accept
            # queue for seconds, which ranks spread over real processes never did here).
            deadline = time.monotonic() + 60
            while self.emulated and not all(up[r] for r in ranks) and p.is_alive():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {ranks} did not come up within 60 s")
                time.sleep(0.05)
        hb = [keys.heartbeat(spec.group, 0, r) for r in range(spec.world)]
        deadline = time.monotonic() + args.start_timeout_s
        while not (all(up) and observer.check(hb)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(up)}/{spec.world} ranks up after "
                                   f"{args.start_timeout_s}s")
            if current_epoch(observer, spec.group) > 0:
                raise RuntimeError("the group was fenced during start-up (a rank starved of "
                                   "CPU for heartbeat_stale_s was named)")
            dead = [p.pid for _, p in self.procs if not p.is_alive()]
            if dead:
                why = []
                while True:
                    try:
                        why.append(pickle.loads(results.get(timeout=1))["error"])
                    except queue.Empty:
                        break
                raise RuntimeError(f"rank processes {dead} exited during start-up: {why[:2]}")
            time.sleep(0.2)
        started_s = time.time() - t_start
        time.sleep(args.settle_s)

        # Steady window: everyone beating, nobody dead.
        rank_ps = [psutil.Process(p.pid) for _, p in self.procs]
        self._load = os.getloadavg()[0]
        w0, c0, s0 = time.time(), list(counts), _store_cpu(store_ps)
        box0, r0 = psutil.cpu_times(), sum(_store_cpu(p) for p in rank_ps)
        time.sleep(args.window_s)
        w1, c1, s1 = time.time(), list(counts), _store_cpu(store_ps)
        box1, r1 = psutil.cpu_times(), sum(_store_cpu(p) for p in rank_ps)
        self._ranks_cpu = (r1 - r0) / (w1 - w0)

        # The kill.
        killed_procs = set()
        kill_at = time.time()
        if not self.emulated:
            for v in self.victims:
                os.kill(self.procs[v][1].pid, signal.SIGKILL)
                killed_procs.add(v)
        elif len(self.victims) > 1:
            index = self.victims[0] // (spec.ranks_per_host or spec.world)
            os.kill(self.procs[index][1].pid, signal.SIGKILL)
            killed_procs.add(index)
        else:
            for v in self.victims:
                kill_flags[v] = 1
        k0, ks0 = list(counts), _store_cpu(store_ps)

        # Recovery: the members of a new epoch published, every one of them beating in it.
        ready_seen, final_epoch = None, 0
        deadline = time.monotonic() + args.recover_timeout_s
        while time.monotonic() < deadline:
            epoch = current_epoch(observer, spec.group)
            members = epochs.published(observer, spec.group, epoch) if epoch else None
            if members is not None and observer.check(
                    [keys.heartbeat(spec.group, epoch, i) for i in range(len(members.members))]
                    + [keys.serving(spec.group, epoch)]):
                ready_seen, final_epoch = time.time(), epoch
                break
            time.sleep(0.05)
        k1, ks1 = list(counts), _store_cpu(store_ps)
        recover_wall = (ready_seen or time.time()) - kill_at
        time.sleep(args.post_s)  # late verdicts (false ones) still land in the results
        final_epoch = current_epoch(observer, spec.group)

        stop[0] = 1
        expected = len(self.procs) - len(killed_procs)
        collected = []
        deadline = time.monotonic() + 60
        while len(collected) < expected and time.monotonic() < deadline:
            try:
                collected.append(pickle.loads(results.get(timeout=1)))
            except queue.Empty:
                continue
        errors = [c["error"] for c in collected if c["error"]]
        per_rank = {r["rank"]: r for c in collected for r in c["results"]}
        if self.emulated and len(self.victims) == 1:
            kill_at = per_rank.get(self.victims[0], {}).get("killed_at") or kill_at
        return self._row(per_rank, errors, kill_at, ready_seen, final_epoch, started_s,
                         (w0, w1, c0, c1, s0, s1, box0, box1), (k0, k1, ks0, ks1, recover_wall))

    def _teardown(self) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop[0] = 1
        for _, p in self.procs:
            p.join(timeout=5)
        for _, p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if self.store_proc is not None:
            try:
                self._store_conn.send(1)
            except Exception:  # noqa: BLE001 - it is killed below anyway
                pass
            self.store_proc.join(timeout=5)
            if self.store_proc.is_alive():
                self.store_proc.kill()
                self.store_proc.join(timeout=5)

    # ------------------------------------------------------------ the row
    def _row(self, per_rank, errors, kill_at, ready_seen, final_epoch, started_s, steady,
             recovery) -> dict:
        spec, victims = self.spec, set(self.victims)
        w0, w1, c0, c1, s0, s1, box0, box1 = steady
        k0, k1, ks0, ks1, recover_wall = recovery
        survivors = [r for r in range(spec.world) if r not in victims]
        window = w1 - w0
        ranks = range(spec.world)
        delta = {k: cp.totals(c1, ranks)[k] - cp.totals(c0, ranks)[k]
                 for k in cp.totals(c1, ranks)}
        rec = {k: cp.totals(k1, ranks)[k] - cp.totals(k0, ranks)[k] for k in ("requests", "keys")}
        busy = lambda t: sum(t) - t.idle - getattr(t, "iowait", 0)  # noqa: E731
        box_util = (busy(box1) - busy(box0)) / (window * psutil.cpu_count())

        gaps, beats = [], []
        for r in survivors:
            if r not in per_rank:
                continue
            hb = [t for t in per_rank[r]["heartbeats"] if w0 <= t <= w1]
            beats.append(len(hb))
            gaps += [b - a for a, b in zip(hb, hb[1:])]

        detect, named, kinds, false, first_named = [], [], {}, [], {}
        for r in survivors:
            res = per_rank.get(r)
            if res is None:
                continue
            own = [x for x in res["reports"] if x["epoch"] == 0 and victims & set(x["suspects"])]
            for x in res["reports"]:
                wrong = set(x["suspects"]) - victims if x["epoch"] == 0 else set(x["suspects"])
                if wrong:
                    false.append({"reporter": r, "epoch": x["epoch"], "kind": x["kind"],
                                  "reason": x["reason"][:160]})
            firsts = [t for t in ([own[0]["detected_at"]] if own else []) + [res["fence_seen_at"]]
                      if t is not None]
            if own:
                first_named[len(victims & set(own[0]["suspects"]))] = \
                    first_named.get(len(victims & set(own[0]["suspects"])), 0) + 1
                named.append(own[0]["detected_at"] - kill_at)
                kinds[own[0]["kind"]] = kinds.get(own[0]["kind"], 0) + 1
            if firsts:
                detect.append(min(firsts) - kill_at)
        fences = [t for res in per_rank.values() for t, e in res["fences"] if e >= 1]
        fence_at = min(fences) if fences else None  # (the first fence, even a false one)
        pubs = [t for res in per_rank.values() for t, key in res["publications"]
                if key == keys.members(spec.group, 1)]
        agree_at = min(pubs) if pubs else None
        ready = []
        for r in survivors:
            res = per_rank.get(r)
            t = [e["t"] for e in (res or {}).get("events", [])
                 if e["state"] == "READY" and e["epoch"] >= 1]
            if t:
                ready.append(t[-1])
        finals = {(per_rank[r]["epoch"], tuple(per_rank[r]["members"]))
                  for r in survivors if r in per_rank}
        members_ok = finals == {(final_epoch, tuple(survivors))}
        reads = delta["check_requests"] + delta["get_requests"] + delta["multi_get_requests"]
        return {
            "bench": "control_plane_scale",
            "ranks": spec.world,
            "rank_processes": "emulated" if self.emulated else "real",
            "processes": len(self.layout),
            "ranks_per_process": max(len(x) for x in self.layout),
            "ranks_per_host": spec.ranks_per_host,
            "peer_reads": spec.settings.peer_reads,
            "transport": spec.transport,
            "killed": len(victims),
            "victims": sorted(victims),
            "kill": ("SIGKILL of the rank's process" if not self.emulated else
                     "SIGKILL of the process of virtual host 1" if len(victims) > 1 else
                     "the rank's watchdog stopped, no goodbye"),
            "heartbeat_interval_s": spec.settings.heartbeat_interval_s,
            "heartbeat_stale_s": spec.settings.heartbeat_stale_s,
            "start_s": _r(started_s, 1),
            # steady window
            "window_s": _r(window, 2),
            "store_ops_per_s": round(delta["requests"] / window),
            "store_keys_per_s": round(delta["keys"] / window),
            "store_ops_by_method_per_s": {m: round(delta[f"{m}_requests"] / window)
                                          for m in cp.METHODS if delta[f"{m}_requests"]},
            "reads_per_rank_per_beat": _r(reads / max(1, delta["set_requests"]), 1),
            "store_cpu": _r((s1 - s0) / window),
            # where the ranks beat slower than 1/heartbeat_interval_s (a machine with fewer
            # cores than ranks), the same load at the nominal rate (linear in the beats)
            "store_ops_per_s_nominal": round(delta["requests"] / window / nominal)
            if (nominal := _beat_share(beats, window, spec)) else None,
            "store_cpu_nominal": _r((s1 - s0) / window / nominal) if nominal else None,
            "box_cpu_util": _r(box_util, 2),
            "ranks_cpu": _r(self._ranks_cpu, 2),  # cores the rank processes used
            "loadavg_1m": _r(self._load, 1),  # the machine's load (other work included)
            "beats_per_rank_per_s": _r(sum(beats) / max(1, len(beats)) / window, 2),
            "hb_gap_p50_s": _r(_pct(gaps, 50)),
            "hb_gap_p99_s": _r(_pct(gaps, 99)),
            "hb_gap_max_s": _r(max(gaps) if gaps else None),
            # the kill and the recovery
            "detect_p50_s": _r(_pct(detect, 50)),
            "detect_p99_s": _r(_pct(detect, 99)),
            "detected_by": len(detect),
            "survivors": len(survivors),
            "named_by_own_report": len(named),
            "named_p50_s": _r(_pct(named, 50)),
            "named_kinds": kinds,
            # survivors by how many victims their first report named (a leader waits the
            # join window for a victim its report did not name)
            "first_report_names": {str(k): v for k, v in sorted(first_named.items())},
            "fence_s": _r(fence_at - kill_at if fence_at else None),
            "agree_s": _r(agree_at - kill_at if agree_at else None),
            "ready_s": _r(max(ready) - fence_at if ready and fence_at else None),
            "ready_p50_s": _r(_pct([t - fence_at for t in ready], 50) if fence_at else None),
            "ready_count": len(ready),
            "recovery_store_ops_per_s": round(rec["requests"] / max(recover_wall, 1e-3)),
            "recovery_store_cpu": _r((ks1 - ks0) / max(recover_wall, 1e-3)),
            "recovered": ready_seen is not None,
            "final_epoch": final_epoch,
            "members_ok": members_ok,
            # a fence before the kill: a live rank was named (a rank starved of CPU for
            # heartbeat_stale_s); the latencies of such a row do not measure the kill
            "fenced_before_kill": fence_at is not None and fence_at < kill_at,
            "valid": (ready_seen is not None and members_ok and not false
                      and not (fence_at is not None and fence_at < kill_at)),
            "false_verdicts": len(false),
            "false_verdict_samples": false[:3],
            "tick_errors": sum(res["tick_errors"] for res in per_rank.values()),
            "errors": errors[:3],
        }


def _print_table(rows: list[dict]) -> None:
    head = (f"{'ranks':>5} {'procs':>8} {'reads':>8} {'kill':>4} {'det p50':>7} {'det p99':>7} "
            f"{'agree':>6} {'ready':>6} {'ops/s':>7} {'store cpu':>9} {'box':>4} "
            f"{'gap p99':>7} {'false':>5} {'ok':>3}")
    print(head)
    for r in rows:
        print(f"{r['ranks']:>5} {r['rank_processes']:>8} {r['peer_reads']:>8} {r['killed']:>4} "
              f"{r['detect_p50_s']!s:>7} {r['detect_p99_s']!s:>7} {r['agree_s']!s:>6} "
              f"{r['ready_s']!s:>6} {r['store_ops_per_s']:>7} {r['store_cpu']!s:>9} "
              f"{r['box_cpu_util']!s:>4} {r['hb_gap_p99_s']!s:>7} {r['false_verdicts']:>5} "
              f"{'yes' if r['members_ok'] else 'NO':>3}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 32, 64],
                        help="widths run as one process per rank")
    parser.add_argument("--emulated", type=int, nargs="*", default=[],
                        help="widths run as threads, --ranks-per-host per process")
    parser.add_argument("--kills", type=int, nargs="+", default=[1, 8],
                        help="ranks killed per case (a kill of k > 1 needs more than k ranks)")
    parser.add_argument("--peer-reads", nargs="+", choices=("batched", "per_peer"),
                        default=["batched"], help="the watchdog's peer reads (per_peer: the "
                        "design before, one check per peer and beat)")
    parser.add_argument("--ranks-per-host", type=int, default=8)
    parser.add_argument("--transport", choices=("null", "gloo"), default="null")
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--heartbeat-interval-s", type=float, default=0.1)
    parser.add_argument("--heartbeat-stale-s", type=float, default=2.0)
    parser.add_argument("--join-window-s", type=float, default=3.0)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--post-s", type=float, default=2.0)
    parser.add_argument("--start-timeout-s", type=float, default=240.0)
    parser.add_argument("--recover-timeout-s", type=float, default=60.0)
    parser.add_argument("--attempts", type=int, default=2, help="runs of a case until one "
                        "measures the kill (no false verdict, no fence before it); every "
                        "earlier attempt is listed in the row")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.transport == "gloo" and args.emulated:
        parser.error("--transport gloo runs one rank per process: no --emulated widths")

    # SIGTERM: tear the case down like any error (no stray rank or store process).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"terminated (SIGTERM) at {time.time()}"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["vllm_elastic_ft.testing.control_plane"])
    settings = WatchdogSettings(heartbeat_interval_s=args.heartbeat_interval_s,
                                heartbeat_stale_s=args.heartbeat_stale_s)
    cases = [(w, False) for w in args.ranks] + [(w, True) for w in args.emulated]
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Each width and kill with every read mode back to back: a before/after pair runs
    # under the same background load.
    for world, emulated in cases:
        for kill in args.kills:
            for reads in args.peer_reads:
                if kill >= world or (kill > 1 and world <= (args.ranks_per_host or world)):
                    continue  # nobody left, or no second host to lose
                spec = cp.ControlPlaneSpec(world, replace(settings, peer_reads=reads),
                                           experts=args.experts,
                                           ranks_per_host=args.ranks_per_host,
                                           join_window_s=args.join_window_s,
                                           transport=args.transport)
                label = f"{world} {'emulated' if emulated else 'real'} ranks, {reads} reads, kill {kill}"
                print(f"== {label} ==", flush=True)
                t0 = time.monotonic()
                earlier = []  # attempts that did not measure the kill, and why
                for _ in range(args.attempts):
                    try:
                        row = Case(ctx, spec, emulated, kill, args).run()
                    except Exception as err:  # noqa: BLE001 - the row says so, the sweep goes on
                        row = {"bench": "control_plane_scale", "ranks": world,
                               "rank_processes": "emulated" if emulated else "real",
                               "peer_reads": reads, "killed": kill,
                               "failed": f"{type(err).__name__}: {err}"}
                        print(f"   failed: {row['failed']}", flush=True)
                    if row.get("valid"):
                        break
                    earlier.append(row.get("failed") or
                                   f"invalid: fenced_before_kill={row['fenced_before_kill']}, "
                                   f"false_verdicts={row['false_verdicts']}, "
                                   f"members_ok={row['members_ok']}")
                row["earlier_attempts"] = earlier[:-1] if not row.get("valid") else earlier
                row["case_s"] = round(time.monotonic() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.out.write_text(json.dumps(rows, indent=2))
    done = [r for r in rows if "failed" not in r]
    if done:
        print()
        _print_table(done)
    return 0 if done and len(done) == len(rows) and all(r["recovered"] for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
