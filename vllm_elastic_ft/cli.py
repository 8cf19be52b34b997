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
    from vllm_elastic_ft.drill import run_drill

    return run_drill(args, _tiny_model(args))


def cmd_ray_drill(args: argparse.Namespace) -> int:
    from vllm_elastic_ft.ray_serve.drill import run_ray_drill

    return run_ray_drill(args, _tiny_model(args))


def cmd_patches(args: argparse.Namespace) -> int:
    from vllm_elastic_ft.vllm.compat import run_report

    return run_report(args.vllm_source, as_json=args.json)


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
    p.add_argument("--fault", choices=("kill", "stop", "slow"), default="kill")
    p.add_argument("--fault-rank", type=int, default=1)
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
