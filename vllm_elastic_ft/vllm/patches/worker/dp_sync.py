"""Put the per-step DP batch synchronisation under the rank watchdog too.

Before every forward, each DP worker all-reduces its batch size over the DP
group (``vllm.v1.worker.dp_utils._run_ar``, vLLM 0.32.0). It is the first
collective of a step, so it is often the one that meets a dead peer first, and
on a hung peer it blocks for gloo's full timeout. Guarding it gives the same
deadline, the same heartbeat sequence numbers and the same FaultReport as the
MoE dispatch and combine.

With ``in_engine_rebuild`` the all-reduce runs on the worker's elastic group
(``vllm/worker_group.py``): ranks lost in a rebuild contribute 0 tokens, and a
failure rebuilds the group and redoes the all-reduce there.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.process_config import process_config
from vllm_elastic_ft.vllm.worker_group import worker_group
from vllm_elastic_ft.vllm.worker_watchdog import current_watchdog
from vllm_elastic_ft.watchdog.guarded import run_guarded

RUN_AR = PatchSpec(
    target="vllm.v1.worker.dp_utils:_run_ar",
    why="The per-step DP all-reduce has no deadline: a dead peer errors without a named "
    "culprit, a hung one blocks for gloo's timeout (1800 s).",
    how="Run it as a guarded call (deadline, heartbeat seq); an error is attributed and "
    "re-raised as RankFaultError (a RuntimeError). A module function: only dp_utils calls "
    "it, through its module globals.",
    upstream="vllm-project/vllm#39863 (/health 200 while a rank is dead), #30112",
    remove_when="vLLM's DP synchronisation takes a timeout and a fault hook.",
    params=("should_ubatch", "orig_num_tokens_per_ubatch", "padded_num_tokens_per_ubatch",
            "cudagraph_mode", "parallel_config"),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (RUN_AR,)


def _make_run_ar(original: Callable[..., Any]) -> Callable[..., Any]:
    def _run_ar(should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                cudagraph_mode, parallel_config):
        args = (should_ubatch, orig_num_tokens_per_ubatch, padded_num_tokens_per_ubatch,
                cudagraph_mode, parallel_config)
        if process_config().enabled and parallel_config.data_parallel_size > 1:
            group = worker_group(parallel_config.data_parallel_rank,
                                 parallel_config.data_parallel_size,
                                 parallel_config.all2all_backend)
            if group is not None:
                # vLLM's [4, N] layout: orig, padded, ubatch, cudagraph mode.
                return group.all_reduce_batch([orig_num_tokens_per_ubatch,
                                               padded_num_tokens_per_ubatch,
                                               1 if should_ubatch else 0, cudagraph_mode])
        # The MoE patches create the watchdog (they know the group); until the
        # first dispatch there is none and the sync runs as stock.
        watchdog = current_watchdog() if process_config().enabled else None
        if watchdog is None:
            return original(*args)
        return run_guarded(watchdog, "dp_sync", lambda seq: original(*args),
                           inject_delay=False)

    return _run_ar


def apply() -> None:
    apply_patch(RUN_AR, _make_run_ar)
