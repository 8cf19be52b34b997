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

from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.comm.transport import GlooTransport
from vllm_elastic_ft.faults.injection import FaultInjection
from vllm_elastic_ft.vllm.patches.worker.cpu_experts import local_expert_pairs
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
    """One rank's share of an MoE layer: router (replicated) and the experts it holds.

    The full weights are the "checkpoint": drawn from a fixed seed, so any rank
    can load any expert from it (what a rebuild does for orphaned experts).
    """

    def __init__(self, spec: MoELoopSpec, rank: int, world: int):
        self.spec = spec
        per_rank = spec.experts // world
        self.hold(range(rank * per_rank, (rank + 1) * per_rank))

    def _checkpoint(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec = self.spec
        g = torch.Generator().manual_seed(1234)
        router = torch.randn(spec.hidden, spec.experts, generator=g) * 0.1
        w13 = torch.randn(spec.experts, 2 * spec.inter, spec.hidden, generator=g) * 0.1
        w2 = torch.randn(spec.experts, spec.hidden, spec.inter, generator=g) * 0.1
        return router, w13, w2

    def hold(self, experts, computes=None) -> list[int]:
        """Hold ``experts`` (loading them from the checkpoint) and compute ``computes``
        (default: all held); returns the experts that were not held before."""
        experts = sorted(experts)
        before = set(getattr(self, "experts_held", ()))
        self.router, w13, w2 = self._checkpoint()
        self.w13, self.w2 = w13[experts], w2[experts]
        self.experts_held = experts
        computes = set(experts if computes is None else computes)
        self.expert_map = torch.full((self.spec.experts,), -1, dtype=torch.int32)
        for slot, expert in enumerate(experts):
            if expert in computes:
                self.expert_map[expert] = slot
        return [e for e in experts if e not in before]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(torch.softmax(x @ self.router, dim=-1), self.spec.top_k)
        return weights, ids.to(torch.int32)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return _expert_sum(x, weights, ids, self.expert_map, self.w13, self.w2)

    def dense_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x`` computed alone, with every expert."""
        router, w13, w2 = self._checkpoint()
        full_map = torch.arange(self.spec.experts, dtype=torch.int32)
        weights, ids = self.route(x)
        return _expert_sum(x, weights, ids, full_map, w13, w2)


def _expert_sum(x, weights, ids, expert_map, w13, w2) -> torch.Tensor:
    token, local, w = local_expert_pairs(ids, weights, expert_map)
    out = torch.zeros_like(x)
    for slot in range(w13.shape[0]):
        pick = (local[:, 0] == slot).nonzero().flatten()
        if pick.numel() == 0:
            continue
        h = x[token[pick]] @ w13[slot].T
        gate, up = h.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[slot].T
        out.index_add_(0, token[pick], y * w[pick])
    return out


def moe_step(layer: MoELayer, watchdog: RankWatchdog, x: torch.Tensor, sizes: list[int],
             group) -> torch.Tensor:
    weights, ids = layer.route(x)
    transport = GlooTransport.over(group)
    all_x, all_w, all_ids = guarded_dispatch(watchdog, transport, [x, weights, ids], sizes)
    partial = layer.experts(all_x, all_w, all_ids)
    return guarded_combine(watchdog, transport, partial, sizes)


def run_moe_loop(rank: int, world: int, store_address: str, spec: MoELoopSpec,
                 settings: WatchdogSettings, report_wait_s: float = 3.0) -> dict:
    """Loop MoE steps until ``spec.steps`` or a fault; return this rank's findings.

    Progress goes to the store: ``loop/step/<rank>`` after each step, so a test
    can inject a fault once every rank is past its warm-up.
    """
    store = connect_store(store_address)
    sink = LogAndCountSink()
    # The harness is a drill: fault injection ('slow') is on here.
    watchdog = RankWatchdog(settings, store, spec.group, rank, world, sink=sink,
                            injection=FaultInjection(store, spec.group, rank))
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
