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
Both methods are vLLM 0.32.0's (``CPUModelRunner`` inherits them). The first
call also hands the worker's group the model and checkpoint it loads
orphaned experts from.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.group.fencing import FencedError
from vllm_elastic_ft.vllm.patching import PatchSpec, apply_patch
from vllm_elastic_ft.vllm.worker_group import WorkerGroup, current_group
from vllm_elastic_ft.watchdog.report import RankFaultError

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
)

DUMMY_RUN = PatchSpec(
    target=f"{_RUNNER}._dummy_run",
    why="An idle DP engine's dummy step runs the same collectives and fails the same way.",
    how="Catch RankFaultError, rebuild the group, run the dummy step again.",
    upstream="vllm-project/vllm#39863",
    remove_when="vLLM can shrink a DP/EP group around a lost rank.",
    params=("self", "num_tokens"),
)

SPECS = (MODEL_FORWARD, DUMMY_RUN)

RECOVERABLE = (RankFaultError, FencedError)


def _recover(group: WorkerGroup, err: BaseException) -> None:
    """Rebuild; a fault during the rebuild (a member vanished) is one more attempt."""
    for _ in range(group.config.max_rebuilds):
        try:
            group.recover(f"{type(err).__name__}: {err}")
            return
        except RankFaultError as again:
            err = again
    group.recover(f"{type(err).__name__}: {err}")


def _make_model_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def _model_forward(self, *args: Any, **kwargs: Any):
        group = current_group()
        if group is None:
            return original(self, *args, **kwargs)
        group.attach_runner(self)
        try:
            return _forward_with_retry(original, group, self, *args, **kwargs)
        finally:
            group.step_done()

    return _model_forward


def _forward_with_retry(original, group: WorkerGroup, runner, *args: Any, **kwargs: Any):
    """Run the forward; after a rank failure, rebuild, redo the batch all-reduce, run it again."""
    for _ in range(group.config.max_rebuilds):
        try:
            return original(runner, *args, **kwargs)
        except RECOVERABLE as err:
            _recover(group, err)
            counts = group.all_reduce_batch((), retry=True)
            from vllm.forward_context import get_forward_context

            context = get_forward_context()
            if context.dp_metadata is not None:
                context.dp_metadata.num_tokens_across_dp_cpu.copy_(counts[1])
            if hasattr(context, "moe_layer_index"):
                context.moe_layer_index = 0
    return original(runner, *args, **kwargs)


def _make_dummy_run(original: Callable[..., Any]) -> Callable[..., Any]:
    def _dummy_run(self, *args: Any, **kwargs: Any):
        group = current_group()
        if group is None:
            return original(self, *args, **kwargs)
        group.attach_runner(self)
        try:
            for _ in range(group.config.max_rebuilds):
                try:
                    return original(self, *args, **kwargs)
                except RECOVERABLE as err:
                    _recover(group, err)
                    group.redo_step_from_top()
            return original(self, *args, **kwargs)
        finally:
            group.step_done()

    return _dummy_run


def apply() -> None:
    apply_patch(MODEL_FORWARD, _make_model_forward)
    apply_patch(DUMMY_RUN, _make_dummy_run)
