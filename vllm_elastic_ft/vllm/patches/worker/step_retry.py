"""Redo the step a rank failure interrupted, on the rebuilt group, instead of failing it.

When a DP peer dies mid-step, every survivor's step fails in one of its
collectives: the batch all-reduce (handled inside it, see ``dp_sync``), or a
MoE dispatch/combine inside the model forward. The forward is safe to run again
with the same inputs (the same KV slots are written with the same values), so:

* ``GPUModelRunner._model_forward`` (a real batch): rebuild the group, redo the
  step's batch all-reduce on it (same step number; the lost ranks now count 0
  tokens), put those counts into the forward context, run the forward again;
* ``GPUModelRunner._dummy_run`` (an engine with no work of its own keeps the
  collectives company): rebuild, then run the whole dummy step again (its
  all-reduce keeps the interrupted step's number).

``execute_model`` itself is never re-run (``_update_states`` is not idempotent).
How often a step is retried is the recovery core's state machine's call
(``group/member.py``), not this patch's.
Both methods are vLLM 0.32.0's (``CPUModelRunner`` inherits them). The first
call also hands the worker's group the model and checkpoint it loads
orphaned experts from.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.worker_group import current_group

_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"

MODEL_FORWARD = PatchSpec(
    target=f"{_RUNNER}._model_forward",
    why="A DP peer's death fails the survivors' forward, and stock vLLM then fails the "
    "worker, its engine and the whole deployment.",
    how="Catch the watchdog's RankFaultError, rebuild the group over the survivors, redo "
    "the step's batch all-reduce, fix the forward context's token counts, forward again.",
    upstream="vllm-project/vllm#39863, #30112 (no rank-failure recovery in DP/EP)",
    remove_when="vLLM can shrink a DP/EP group around a lost rank.",
    params=("self", "input_ids", "positions"),
    vllm_versions=CHECKED_WITH_0_33,
)

DUMMY_RUN = PatchSpec(
    target=f"{_RUNNER}._dummy_run",
    why="An idle DP engine's dummy step runs the same collectives and fails the same way.",
    how="Catch RankFaultError, rebuild the group, run the dummy step again.",
    upstream="vllm-project/vllm#39863",
    remove_when="vLLM can shrink a DP/EP group around a lost rank.",
    params=("self", "num_tokens"),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (MODEL_FORWARD, DUMMY_RUN)


def _fix_forward_context(counts) -> None:
    """After a rebuild the redone batch all-reduce gives new token counts (lost ranks 0)."""
    from vllm.forward_context import get_forward_context

    context = get_forward_context()
    if context.dp_metadata is not None:
        context.dp_metadata.num_tokens_across_dp_cpu.copy_(counts[1])
    if hasattr(context, "moe_layer_index"):
        context.moe_layer_index = 0


def _make_model_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def _model_forward(self, *args: Any, **kwargs: Any):
        group = current_group()
        if group is None:
            return original(self, *args, **kwargs)
        group.attach_runner(self)
        return group.run_forward(lambda: original(self, *args, **kwargs), _fix_forward_context)

    return _model_forward


def _make_dummy_run(original: Callable[..., Any]) -> Callable[..., Any]:
    def _dummy_run(self, *args: Any, **kwargs: Any):
        group = current_group()
        if group is None:
            return original(self, *args, **kwargs)
        group.attach_runner(self)
        return group.run_dummy_step(lambda: original(self, *args, **kwargs))

    return _dummy_run


def apply() -> None:
    apply_patch(MODEL_FORWARD, _make_model_forward)
    apply_patch(DUMMY_RUN, _make_dummy_run)
