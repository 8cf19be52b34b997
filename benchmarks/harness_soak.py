#!/usr/bin/env python
"""Kill + replace one rank again and again on real gloo ranks; watch the survivors' resources.

The in-process counterpart of ``benchmarks/replace_cycles.py`` (no vLLM, no model): a
``--world``-rank group runs the elastic MoE loop (``testing/elastic_moe_loop.py``, the
product's ``GroupMember``, watchdog, membership and gloo transport), and each cycle
SIGKILLs ``--victim``, waits until the survivors serve without it, starts a replacement
process and waits until it is admitted (two epochs per cycle). After each cycle every
survivor measures itself, from a probe thread, and answers through the store:

* ``rss_mib`` (``VmRSS``; ``RssAnon`` and ``RssFile`` apart), threads
  (``/proc/self/task``), fds, sockets, live Python threads;
* glibc's heap (``mallinfo2``: ``in_use_mib`` = allocated, ``free_mib`` = free inside the
  heap, ``mmap_mib``) and its arena count (``malloc_info``): a leak grows ``in_use``;
  fragmentation grows ``free`` (RSS that ``malloc_trim`` can or cannot give back);
* with ``--tracemalloc``: the Python heap traced, and the top growths since the last
  cycle (a snapshot diff by line);
* gc object counts by type, the top growths since the last cycle;
* the lengths of the per-rank lists that live through every epoch (controller events,
  fault reports, retired communicators, expert loads);
* with ``--trim``: RSS again after ``malloc_trim(0)`` (``rss_trimmed_mib``), so the run
  tells memory glibc holds but could return from memory that is really in use.

The parent hosts the group's store (the API server does under vLLM): its key count and
RSS are recorded too. Timeouts are generous (a replacement's start-up takes a small host's
CPUs for seconds); a communicator's timeout is 60 s here, so the retired ones a survivor
keeps until their timeout has passed (``comm/elastic_group.py``) hold threads, sockets and
native memory for that long: at a few seconds per cycle that is up to ~25 of them.

Prints one line per cycle per survivor, the drift per cycle (least squares, all cycles
and the second half), and writes ``runs/harness_soak.json``.

    python benchmarks/harness_soak.py --cycles 40
    python benchmarks/harness_soak.py --cycles 15 --tracemalloc --trim
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from vllm_elastic_ft import faults
from vllm_elastic_ft.group.state_machine import ControllerOptions
from vllm_elastic_ft.testing.elastic_moe_loop import (
    STOP_KEY, ElasticLoopSpec, ElasticRank, loop_progress, wait_for_progress,
)
from vllm_elastic_ft.testing.harness import RankGroup
from vllm_elastic_ft.testing.moe_loop import MoELoopSpec
from vllm_elastic_ft.watchdog.rank_watchdog import WatchdogSettings

PROBE_KEY = "soak/probe"  # the parent sets it to the cycle number; survivors answer


def _report_key(rank: int, cycle: int) -> str:
    return f"soak/report/{rank}/{cycle}"


# ------------------------------------------------------------------ in a rank process
def _libc():
    return ctypes.CDLL("libc.so.6")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def glibc_heap() -> dict:
    """glibc's view of this process's heap (all arenas), in MiB, and the arena count."""
    libc = _libc()
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    out = {"in_use_mib": info.uordblks / 2**20, "free_mib": info.fordblks / 2**20,
           "mmap_mib": info.hblkhd / 2**20, "heap_mib": info.arena / 2**20}
    # malloc_info's XML names each arena (<heap nr="...">): count them.
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    xml = ctypes.string_at(buf, size.value).decode()
    libc.free(buf)
    out["arenas"] = xml.count("<heap nr=")
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def _status_mib(*fields: str) -> dict[str, float]:
    """Fields of ``/proc/self/status`` given in kB, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":")[0]
            if name in fields:
                out[name] = round(int(line.split()[1]) / 1024, 2)
    return out


def _rss_mib() -> float:
    return _status_mib("VmRSS")["VmRSS"]


def _type_counts() -> collections.Counter:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


class _Probe:
    """Answers the parent's probes from a thread of the rank process."""

    def __init__(self, rank: ElasticRank, store_address: str, trim: bool, traced: bool):
        from vllm_elastic_ft.comm.store import connect_store

        self.rank, self.trim, self.traced = rank, trim, traced
        self.store = connect_store(store_address)
        self._types = _type_counts()
        self._snapshot = None
        if traced:
            import tracemalloc

            self._snapshot = tracemalloc.take_snapshot()
        self._last: int | None = None
        threading.Thread(target=self._loop, name="soak-probe", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(0.05)
            try:
                if not self.store.check([PROBE_KEY]):
                    continue
                cycle = int(self.store.get(PROBE_KEY))
                if cycle == self._last:
                    continue
                self._last = cycle
                self.store.set(_report_key(self.rank.id, cycle), json.dumps(self.measure()))
            except Exception as err:  # noqa: BLE001 - the store went away: the run is over
                print(f"soak probe of rank {self.rank.id}: {err!r}", file=sys.stderr)
                return

    def measure(self) -> dict:
        gc.collect()
        r = self.rank
        pg = getattr(r.transport, "_pg", None)
        mem = _status_mib("VmRSS", "RssAnon", "RssFile")
        out = {"rss_mib": mem["VmRSS"], "rss_anon_mib": mem["RssAnon"],
               "rss_file_mib": mem["RssFile"], "threads": len(os.listdir("/proc/self/task")),
               "py_threads": sorted(t.name for t in threading.enumerate()),
               "fds": len(os.listdir("/proc/self/fd")), **glibc_heap(),
               "lists": {"controller_events": len(r.controller.events),
                         "fault_reports": len(r.sink.reports),
                         "retired_pgs": len(pg._retired) if pg is not None else None,
                         "loaded_experts": len(r.member.loaded_experts),
                         "timeline": len(r.timeline),
                         "watchdog_logged_bad": len(r.watchdog._logged_bad),
                         "watchdog_reported": len(r.watchdog._reported),
                         "watchdog_heard": len(r.watchdog._heard)}}
        types = _type_counts()
        out["gc_objects"] = sum(types.values())
        out["gc_growth"] = dict((types - self._types).most_common(12))
        self._types = types
        if self.traced:
            import tracemalloc

            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            out["traced_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
            out["traced_growth"] = [
                f"{s.size_diff / 1024:+.1f} KiB {s.count_diff:+d} blocks "
                f"{s.traceback[0].filename}:{s.traceback[0].lineno}"
                for s in snap.compare_to(self._snapshot, "lineno")[:10] if s.size_diff]
            self._snapshot = snap
        if self.trim:
            _libc().malloc_trim(0)
            out["rss_trimmed_mib"] = _rss_mib()
            out["after_trim"] = glibc_heap()
        return out


class _PacedRank(ElasticRank):
    """The harness rank, pausing between steps (a soak need not load the host)."""

    pause_s = 0.0

    def step(self, retry: bool = False):
        out = super().step(retry)
        if self.pause_s:
            time.sleep(self.pause_s)
        return out


def soak_rank(rank_id: int, world: int, store_address: str, spec: ElasticLoopSpec,
              settings: WatchdogSettings, trim: bool, traced: bool, pause_s: float) -> dict:
    """``run_elastic_loop`` with a probe thread beside it."""
    import faulthandler

    faulthandler.enable()
    if traced:
        import tracemalloc

        tracemalloc.start(1)
    rank = _PacedRank(rank_id, world, store_address, spec, settings)
    rank.pause_s = pause_s
    _Probe(rank, store_address, trim, traced)
    try:
        reason = rank.run()
    finally:
        rank.watchdog.shutdown()
        rank.member.shutdown()
    return {"exit": reason, "epoch": rank.member.epoch, "members": list(rank.member.live),
            "mismatches": rank.mismatches, "state": rank.controller.view.state.value}


# ------------------------------------------------------------------------ in the parent
def _slope(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((x - mx) * (v - my) for x, v in enumerate(values)) / sum(
        (x - mx) ** 2 for x in range(n))


def _probe(group: RankGroup, ranks: list[int], cycle: int, timeout_s: float = 60) -> dict:
    group.store.set(PROBE_KEY, str(cycle))
    deadline = time.monotonic() + timeout_s
    out = {}
    for r in ranks:
        key = _report_key(r, cycle)
        while not group.store.check([key]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {r} did not answer probe {cycle}")
            time.sleep(0.05)
        out[r] = json.loads(group.store.get(key))
    return out


def _psutil(pid: int) -> dict:
    import psutil

    p = psutil.Process(pid)
    with p.oneshot():
        return {"ps_rss_mib": round(p.memory_info().rss / 2**20, 1), "ps_threads": p.num_threads(),
                "ps_fds": p.num_fds(), "ps_sockets": len(p.net_connections(kind="all"))}


SERIES = ("rss_mib", "rss_anon_mib", "rss_file_mib", "in_use_mib", "free_mib", "mmap_mib",
          "arenas", "threads", "fds", "gc_objects", "traced_mib", "rss_trimmed_mib", "ps_sockets")


def _run_cycles(group: RankGroup, args, joiner: ElasticLoopSpec, settings, extra,
                survivors: list[int], rows: list[dict]) -> None:
    victim_pid = group.pids[args.victim]
    for cycle in range(args.cycles):
        started = time.monotonic()
        # Where the group is now (a slow host may have cost an extra epoch or two).
        epoch = max(loop_progress(group.store, r)[0] for r in survivors)
        faults.signal_process("kill", victim_pid, args.victim)
        wait_for_progress(group.store, survivors, epoch + 1, args.steps, 120)
        victim_pid = group.spawn(args.victim, soak_rank, joiner, settings, *extra)
        wait_for_progress(group.store, range(args.world), epoch + 2, args.steps, 180)
        took = time.monotonic() - started
        probes = _probe(group, survivors, cycle)
        # The store's host (the parent here, the API server under vLLM) keeps every key.
        host = {"store_keys": group.store.num_keys(), "host_rss_mib": _rss_mib()}
        for r, m in probes.items():
            m.update(_psutil(group.procs[r].pid))
            epoch = loop_progress(group.store, r)[0]
            rows.append({"cycle": cycle, "rank": r, "epoch": epoch, "cycle_s": round(took, 1),
                         **host, **m})
            print(f"cycle {cycle:3d} rank {r} epoch {epoch:3d} {took:5.1f}s "
                  f"rss {m['rss_mib']:8.2f} (anon {m['rss_anon_mib']:7.2f} file "
                  f"{m['rss_file_mib']:6.2f}) in_use {m['in_use_mib']:7.2f} "
                  f"free {m['free_mib']:6.2f} mmap {m['mmap_mib']:6.2f} "
                  f"arenas {m['arenas']:2d} thr {m['threads']:3d} fds {m['fds']:3d} "
                  f"socks {m['ps_sockets']:3d} gc {m['gc_objects']:7d}"
                  + (f" traced {m['traced_mib']:6.2f}" if "traced_mib" in m else "")
                  + (f" trimmed {m['rss_trimmed_mib']:8.2f}" if "rss_trimmed_mib" in m
                     else "") + f" keys {host['store_keys']} lists {m['lists']}", flush=True)
            if m.get("traced_growth"):
                print("    traced growth: " + "; ".join(m["traced_growth"][:5]), flush=True)
            if m.get("gc_growth"):
                print(f"    gc growth: {m['gc_growth']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=3)
    parser.add_argument("--victim", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="correct steps per epoch before "
                                                             "moving on")
    parser.add_argument("--pause-s", type=float, default=0.01, help="between steps")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each probe")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/harness_soak.json"))
    args = parser.parse_args(argv)
    # Generous deadlines and budgets: a loaded host (a replacement's start-up takes the
    # CPUs for seconds) must not turn slowness into extra faults. A dead rank is still
    # named at once (its process is gone).
    settings = WatchdogSettings(deadline_s=20.0, warmup_calls=10, heartbeat_interval_s=0.1,
                                heartbeat_stale_s=10.0)
    moe = MoELoopSpec(group="elastic", experts=2 * args.world)  # two per rank
    options = ControllerOptions(rebuild_budget_s=90.0, max_rebuilds=3, min_live_ranks=1)
    # A rank a host stall got fenced out asks to join again (the soak goes on).
    spec = ElasticLoopSpec(moe=moe, options=options, pg_timeout_s=60.0, join_window_s=10.0,
                           rejoin_when_fenced=True)
    joiner = replace(spec, joiner=True)
    extra = (args.trim, args.tracemalloc, args.pause_s)
    survivors = [r for r in range(args.world) if r != args.victim]
    rows: list[dict] = []
    error = None
    with RankGroup(soak_rank, args.world, spec, settings, *extra) as group:
        wait_for_progress(group.store, range(args.world), 0, args.steps, 120)
        baseline = _probe(group, survivors, -1)
        try:
            _run_cycles(group, args, joiner, settings, extra, survivors, rows)
        except (TimeoutError, RuntimeError) as err:  # report the cycles done
            error = f"{type(err).__name__}: {err}"
            print(f"stopped early: {error}", flush=True)
        group.store.set(STOP_KEY, "1")
        try:
            final = group.results(list(range(args.world)) if error is None else survivors,
                                  timeout_s=60)
        except (TimeoutError, RuntimeError) as err:
            final, error = {}, error or f"{type(err).__name__}: {err}"
    summary = {"baseline": baseline, "final": final, "error": error, "drift_per_cycle": {}}
    for r in survivors:
        mine = [row for row in rows if row["rank"] == r]
        half = mine[len(mine) // 2:]
        summary["drift_per_cycle"][r] = {
            k: {"all": round(_slope([row[k] for row in mine]), 3),
                "2nd_half": round(_slope([row[k] for row in half]), 3),
                "first": mine[0][k], "last": mine[-1][k]}
            for k in SERIES + ("store_keys", "host_rss_mib") if mine and k in mine[0]}
    print(f"{'rank':>4} {'series':>16} {'first':>10} {'last':>10} {'/cycle':>8} "
          f"{'/cycle 2nd half':>15}")
    for r, series in summary["drift_per_cycle"].items():
        for k, d in series.items():
            print(f"{r:>4} {k:>16} {d['first']:>10} {d['last']:>10} {d['all']:>8} "
                  f"{d['2nd_half']:>15}")
    print(json.dumps(final))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows, "summary": summary}, indent=1))
    ok = error is None and all(f["exit"] == "stopped" and f["mismatches"] == 0
                               for f in final.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
