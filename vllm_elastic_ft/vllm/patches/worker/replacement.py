"""Let a replacement DP rank's worker start beside a running group.

The patch changes nothing in an ordinary worker: it acts only in a process
started by ``vllm/replacement.py`` (``VLLM_ELASTIC_FT_REPLACES_RANK`` set in the
replacement engine core, inherited by its worker). The engine core's side
(its DP group, the admission utilities) is ``patches/engine_core/replacement.py``.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.replacement import (
    alone_in_world, replaced_rank, take_logical_dp_rank,
)

WORKER_DISTRIBUTED_INIT = PatchSpec(
    target="vllm.v1.worker.cpu_worker:init_worker_distributed_environment",
    why="A worker's torch.distributed world spans every DP rank and is formed once, at "
    "start-up; a replacement worker cannot enter it.",
    how="In a replacement worker only: build the world and groups as if DP were 1, then make "
    "the DP/EP coordinators report the replaced DP rank of N (they carry no traffic).",
    upstream="vllm-project/vllm#30112",
    remove_when="vLLM can add a rank to a running DP/EP group on CPU.",
    params=("vllm_config", "rank", "distributed_init_method", "local_rank", "backend"),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (WORKER_DISTRIBUTED_INIT,)


def _make_worker_distributed_init(original: Callable[..., Any]) -> Callable[..., Any]:
    def init_worker_distributed_environment(vllm_config, rank: int,
                                            distributed_init_method: str | None = None,
                                            local_rank: int = -1, backend: str = "nccl"):
        replaced = replaced_rank()
        if replaced is None:
            return original(vllm_config, rank, distributed_init_method, local_rank, backend)
        parallel_config = vllm_config.parallel_config
        with alone_in_world(parallel_config):
            original(vllm_config, rank, distributed_init_method, local_rank, backend)
        take_logical_dp_rank(replaced, parallel_config.data_parallel_size,
                             parallel_config.enable_expert_parallel)

    return init_worker_distributed_environment


def apply() -> None:
    apply_patch(WORKER_DISTRIBUTED_INIT, _make_worker_distributed_init)
