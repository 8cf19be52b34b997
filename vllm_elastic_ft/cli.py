"""``vllm-elastic-ft``: the project's command line.

Verbs:
  build-model   write (or find) the tiny random-weight MoE checkpoint; print its path
  serve         run vLLM's OpenAI server with the plugin (tiny MoE by default)
  fault         inject a fault into one rank of a running server (kill, stop, cont, slow)
  drill         the main job: a DP+EP deployment under load loses a rank and comes
                back; timeline, plot and JSON (detect/fence/rebuild/interruption,
                requests lost, outputs checked)
  ray-drill     the same on Ray Serve LLM: two gangs, one loses a rank; in-place heal
                vs Ray's gang restart, per-gang throughput
  patches       check every patched / privately used vLLM symbol against a vLLM tree
  plan          availability planner: expected goodput and time at full width for group
                widths x group counts, in-engine recovery vs gang restart (no servers)
"""

from __future__ import annotations

import argparse
import os
import sys

from vllm_elastic_ft import faults
from vllm_elastic_ft.comm.store import connect_store


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from vllm_elastic_ft.testing.tiny_moe import ARCHITECTURES

    g = p.add_argument_group("tiny MoE checkpoint")
    g.add_argument("--architecture", default="qwen3_moe", choices=ARCHITECTURES)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--top-k", type=int, default=2)


def _tiny_model(args: argparse.Namespace) -> str:
    from vllm_elastic_ft.testing.tiny_moe import TinyMoESpec, build_tiny_moe

    spec = TinyMoESpec(architecture=args.architecture, num_layers=args.layers,
                       hidden_size=args.hidden, num_experts=args.experts, top_k=args.top_k)
    return str(build_tiny_moe(spec))


def cmd_build_model(args: argparse.Namespace) -> int:
    print(_tiny_model(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vllm_elastic_ft.testing.server import ServerSpec

    model = args.model or _tiny_model(args)
    spec = ServerSpec(model, data_parallel_size=args.dp, expert_parallel=args.ep,
                      plugin=not args.stock, extra_args=args.vllm_args)
    argv = spec.argv(args.port)
    print("+", " ".join(argv), flush=True)
    os.execvpe(argv[0], argv, spec.environ())
    return 0  # not reached


def cmd_fault(args: argparse.Namespace) -> int:
    if args.kind == "slow":
        if not args.store:
            raise SystemExit("fault slow: --store host:port is required (the server logs "
                             "'watchdog store hosted at ...')")
        faults.set_slow(connect_store(args.store), args.group, args.rank, args.delay_s)
        print(f"rank {args.rank}: {args.delay_s}s added to every dispatch/combine")
        return 0
    pid = args.pid or faults.rank_pid(args.server_pid, args.rank, args.role)
    injection = faults.signal_process(args.kind, pid, args.rank)
    print(f"{args.kind}: sent to pid {pid} ({args.role} of DP rank {args.rank}) at {injection.at:.3f}")
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    from vllm_elastic_ft.drill import check_drill_args, run_drill

    check_drill_args(args)  # before any model is built or loaded
    return run_drill(args, _tiny_model(args))


def cmd_ray_drill(args: argparse.Namespace) -> int:
    from vllm_elastic_ft.ray_serve.drill import run_ray_drill

    return run_ray_drill(args, _tiny_model(args))


def cmd_patches(args: argparse.Namespace) -> int:
    from vllm_elastic_ft.vllm.compat import run_report

    return run_report(args.vllm_source, as_json=args.json)


def cmd_plan(args: argparse.Namespace) -> int:
    from vllm_elastic_ft import planner

    inputs = planner.PlanInputs(
        detect_s=args.detect_s, recover_s=args.recover_s, rejoin_s=args.rejoin_s,
        admission_pause_s=args.admission_pause_s, gang_restart_s=args.gang_restart_s,
        giveup_prob=args.giveup_prob, mtbf_s=args.mtbf_s,
        inflight_per_group=args.inflight_per_group, widths=tuple(args.widths),
        groups=tuple(args.groups), total_ranks=args.total_ranks)
    try:
        rows = planner.plan(inputs)  # validates first: bad input writes nothing
    except planner.PlanInputError as exc:
        raise SystemExit(f"plan: {exc}") from None
    print(planner.format_table(inputs, rows), end="")
    if args.json:
        planner.write_json(args.json, inputs, rows)
        print(f"wrote {args.json}")
    if args.plot:
        planner.write_plot(args.plot, inputs, rows)
        print(f"wrote {args.plot}")
    return 0


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from vllm_elastic_ft.planner import LLAMA3_MTBF_S, PlanInputs

    d = PlanInputs()
    m = p.add_argument_group("measured inputs (defaults: this project's drills on a 2-core CPU "
                             "host with the tiny MoE, README 'Ray Serve LLM' / 'Benchmarks')")
    m.add_argument("--detect-s", type=float, default=d.detect_s,
                   help="kill -> FaultReport (measured 0.008-0.23 s; default %(default)s)")
    m.add_argument("--recover-s", type=float, default=d.recover_s,
                   help="fence -> serving again at N-1 (measured 0.17-0.3 s; default %(default)s)")
    m.add_argument("--rejoin-s", type=float, default=d.rejoin_s,
                   help="time at N-1 until the lost rank is back in place, model reload included "
                   "(Ray Serve: 41-130 s; vllm serve: ~27 s engine start; default %(default)s)")
    m.add_argument("--admission-pause-s", type=float, default=d.admission_pause_s,
                   help="the whole group paused to admit the rejoined rank (measured "
                   "0.07-0.13 s; default %(default)s)")
    m.add_argument("--gang-restart-s", type=float, default=d.gang_restart_s,
                   help="Ray Serve's stock recovery, the whole group restarted, kill -> serving "
                   "(measured 104-184 s; default %(default)s)")
    m.add_argument("--inflight-per-group", type=float, default=d.inflight_per_group,
                   help="requests in flight per group, lost by a stock gang restart (the "
                   "drill's load: %(default)s)")
    a = p.add_argument_group("assumptions (not measured here)")
    a.add_argument("--mtbf-s", type=float, default=d.mtbf_s,
                   help="per-rank mean time between failures, s. Default %.3g s (5.8 years): "
                   "Meta's Llama 3 report, 419 unexpected interruptions in 54 days on 16,384 "
                   "GPUs; a public figure, not our measurement" % LLAMA3_MTBF_S)
    a.add_argument("--giveup-prob", type=float, default=d.giveup_prob,
                   help="probability that in-engine recovery gives up and the gang is restarted "
                   "(default %(default)s: it never did in the drills)")
    g = p.add_argument_group("layouts")
    g.add_argument("--widths", type=int, nargs="+", default=list(d.widths),
                   help="group widths W, ranks per DP group, each >= 2 (default %(default)s)")
    g.add_argument("--groups", type=int, nargs="+", default=list(d.groups),
                   help="group counts G, each >= 1 (default %(default)s)")
    g.add_argument("--total-ranks", type=int, default=None,
                   help="instead of --groups: a fixed total R, G = R / W (each width must "
                   "divide R)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and inputs as JSON")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG: goodput loss vs width (log "
                   "scale) per mode, and the share of time some group is below full width")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-elastic-ft", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("build-model", help="build the tiny MoE checkpoint, print its path")
    _add_model_args(p)
    p.set_defaults(func=cmd_build_model)

    p = verbs.add_parser("serve", help="vLLM OpenAI server with the plugin")
    _add_model_args(p)
    p.add_argument("--model", help="checkpoint (default: the tiny MoE)")
    p.add_argument("--dp", type=int, default=2, help="data-parallel size")
    p.add_argument("--ep", action=argparse.BooleanOptionalAction, default=True,
                   help="--enable-expert-parallel")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--stock", action="store_true", help="without the plugin (stock vLLM)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="more api_server arguments, after --")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("fault", help="inject a fault into one rank")
    p.add_argument("kind", choices=faults.FAULT_KINDS)
    p.add_argument("--rank", type=int, required=True, help="DP rank")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--server-pid", type=int, help="pid of the vLLM API server")
    target.add_argument("--pid", type=int, help="signal this pid directly")
    p.add_argument("--role", choices=faults.PROCESS_ROLES, default="worker",
                   help="which process of the rank (kill/stop/cont)")
    p.add_argument("--delay-s", type=float, default=0.5, help="slow: added delay per call")
    p.add_argument("--store", help="slow: the watchdog store as secret@host:port (the "
                   "address the server was given, the secret in VLLM_ELASTIC_FT_STORE_SECRET)")
    p.add_argument("--group", default="dp", help="slow: group name in the store")
    p.set_defaults(func=cmd_fault)

    p = verbs.add_parser("drill", help="the main job: a rank fails under load; timeline + JSON")
    _add_model_args(p)
    p.add_argument("--dp", type=int, default=4, help="data-parallel size (EP on)")
    p.add_argument("--fault", choices=("kill", "stop", "slow", "partition"), default="kill",
                   help="partition (with --nodes 2 or more): the fault rank's node loses its "
                   "link, its processes live on; the link comes back once the group serves")
    p.add_argument("--fault-rank", type=int, default=1)
    p.add_argument("--nodes", type=int, default=1,
                   help="run the ranks on this many simulated nodes (network + PID namespaces, "
                   "needs root): vLLM's API server on node 0, its headless launcher on the "
                   "others, --dp / --nodes ranks each")
    p.add_argument("--slow-delay-s", type=float, default=3.0,
                   help="slow: delay added to each of the rank's dispatch/combine calls")
    p.add_argument("--second-fault-rank", type=int, default=None,
                   help="also kill this rank while the survivors rebuild")
    p.add_argument("--rebuild-hold-s", type=float, default=2.0,
                   help="with --second-fault-rank: injected time each rebuild is held")
    p.add_argument("--role", choices=faults.PROCESS_ROLES, default="worker")
    p.add_argument("--rejoin", action="store_true",
                   help="once the group serves again, start a replacement for the lost rank "
                   "(POST /elastic_ft/replace) and admit it: the group goes back to --dp ranks")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=2.0, help="watchdog deadline")
    p.add_argument("--rebuild-budget-s", type=float, default=10.0,
                   help="how long the orchestrator lets a fenced group heal before restarting it")
    p.add_argument("--retry-for-s", type=float, default=600.0,
                   help="how long the client retries a request refused with 503 (the "
                   "design's answer while the group is fenced, as an ingress would); any other "
                   "failure is a lost request")
    p.add_argument("--stream-every", type=int, default=2, metavar="N",
                   help="stream every N-th request through the OpenAI client (no retries); "
                   "0: plain completions only (default: 2, half of them)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the same load and fault with a group restart instead of the "
                   "in-engine rebuild, and the deployment on stock vLLM (no plugin)")
    p.add_argument("--out", default="runs/drill", help="folder for the timeline, plot, JSON, logs")
    p.set_defaults(func=cmd_drill)

    p = verbs.add_parser("ray-drill", help="Ray Serve: two gangs, one loses a rank under load; "
                         "in-place heal vs Ray's gang restart (needs the ray extra)")
    _add_model_args(p)
    from vllm_elastic_ft.ray_serve.drill import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_ray_drill)

    p = verbs.add_parser("patches", help="do the plugin's patches and private vLLM accesses "
                         "still hold in a vLLM source tree (parsed, not imported)?")
    p.add_argument("--vllm-source", metavar="DIR", help="a vLLM checkout or unpacked wheel "
                   "(holding vllm/), or the vllm package dir (default: the installed vLLM)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_patches)

    p = verbs.add_parser("plan", help="availability planner: goodput and time at full width "
                         "per group width and count, in-engine recovery vs gang restart",
                         description="Expected goodput, share of time at full width, failures "
                         "a day and requests lost, for G groups of W ranks, in-engine recovery "
                         "vs Ray Serve's gang restart. The timing inputs default to what this "
                         "project's drills measured (2-core CPU host, tiny MoE); the per-rank "
                         "MTBF is a public figure. Model and approximations: "
                         "vllm_elastic_ft/planner.py.")
    _add_plan_args(p)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "vllm_args", None) and args.vllm_args[0] == "--":
        args.vllm_args = args.vllm_args[1:]
    if args.verb == "fault" and args.kind != "slow" and not (args.pid or args.server_pid):
        raise SystemExit("fault: give --server-pid (find the rank's process) or --pid")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
