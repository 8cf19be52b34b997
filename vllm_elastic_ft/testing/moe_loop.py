"""A real MoE layer's dispatch -> experts -> combine, looped on gloo ranks under the watchdog.

What the harness failure tests (and the CPU kernel benchmark) run in each rank
process: every rank routes its own tokens, the guarded dispatch all-gathers
them, the rank computes its local experts (SiLU-gated MLPs, plain torch), and
the guarded combine returns each rank's rows summed over ranks. It is the data
path vLLM's allgather_reducescatter all2all runs on CPU, without the engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from vllm_elastic_ft.faults import connect_store
from vllm_elastic_ft.vllm.patches.cpu_experts import local_expert_pairs
from vllm_elastic_ft.watchdog.guarded import guarded_combine, guarded_dispatch
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings
from vllm_elastic_ft.watchdog.report import LogAndCountSink, RankFaultError


@dataclass(frozen=True)
class MoELoopSpec:
    hidden: int = 64
    experts: int = 8
    top_k: int = 2
    inter: int = 32
    tokens: int = 16
    steps: int = 1_000_000  # until a fault, unless fewer are asked for
    step_pause_s: float = 0.0
    group: str = "harness"


class MoELayer:
    """One rank's share of an MoE layer: router (replicated) and local experts."""

    def __init__(self, spec: MoELoopSpec, rank: int, world: int):
        g = torch.Generator().manual_seed(1234)
        self.router = torch.randn(spec.hidden, spec.experts, generator=g) * 0.1
        w13 = torch.randn(spec.experts, 2 * spec.inter, spec.hidden, generator=g) * 0.1
        w2 = torch.randn(spec.experts, spec.hidden, spec.inter, generator=g) * 0.1
        per_rank = spec.experts // world
        local = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.w13, self.w2 = w13[local], w2[local]
        self.expert_map = torch.full((spec.experts,), -1, dtype=torch.int32)
        self.expert_map[local] = torch.arange(len(local), dtype=torch.int32)
        self.top_k = spec.top_k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(torch.softmax(x @ self.router, dim=-1), self.top_k)
        return weights, ids.to(torch.int32)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        token, local, w = local_expert_pairs(ids, weights, self.expert_map)
        out = torch.zeros_like(x)
        for slot in range(self.w13.shape[0]):
            pick = (local[:, 0] == slot).nonzero().flatten()
            if pick.numel() == 0:
                continue
            h = x[token[pick]] @ self.w13[slot].T
            gate, up = h.chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ self.w2[slot].T
            out.index_add_(0, token[pick], y * w[pick])
        return out


def moe_step(layer: MoELayer, watchdog: RankWatchdog, x: torch.Tensor, sizes: list[int],
             group) -> torch.Tensor:
    weights, ids = layer.route(x)
    all_x, all_w, all_ids = guarded_dispatch(watchdog, [x, weights, ids], sizes, group)
    partial = layer.experts(all_x, all_w, all_ids)
    return guarded_combine(watchdog, partial, sizes, group)


def run_moe_loop(rank: int, world: int, store_address: str, spec: MoELoopSpec,
                 settings: WatchdogSettings, report_wait_s: float = 3.0) -> dict:
    """Loop MoE steps until ``spec.steps`` or a fault; return this rank's findings.

    Progress goes to the store: ``loop/step/<rank>`` after each step, so a test
    can inject a fault once every rank is past its warm-up.
    """
    store = connect_store(store_address)
    sink = LogAndCountSink()
    watchdog = RankWatchdog(settings, store, spec.group, rank, world, sink=sink)
    layer = MoELayer(spec, rank, world)
    sizes = [spec.tokens + r for r in range(world)]  # uneven on purpose
    x = torch.randn(sizes[rank], spec.hidden, generator=torch.Generator().manual_seed(rank))
    fault: dict | None = None
    step = 0
    try:
        for step in range(1, spec.steps + 1):
            moe_step(layer, watchdog, x, sizes, dist.group.WORLD)
            store.set(f"loop/step/{rank}", str(step))
            if spec.step_pause_s:
                time.sleep(spec.step_pause_s)
    except RankFaultError as err:
        fault = {"op": err.op, "seq": err.seq, "peer_closed": err.peer_closed, "at": time.time(),
                 "error": str(err)[:300]}
        # The verdict is the watcher's job; give it a moment to name the suspect.
        deadline = time.monotonic() + report_wait_s
        while not sink.reports and time.monotonic() < deadline:
            time.sleep(0.02)
    watchdog.shutdown(clean=True)  # leaving the loop is deliberate, even after a fault
    return {
        "rank": rank,
        "steps": step,
        "fault": fault,
        "reports": [asdict(r) | {"kind": r.kind.value} for r in sink.reports],
        "backend": watchdog.monitor_backend,
    }
