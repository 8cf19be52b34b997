"""Let the DP engine cores keep syncing after one of them is lost.

Every few steps the DP engine cores all-reduce "any work left / everyone
pausing?" over a gloo group (``ParallelConfig.sync_dp_state``, called only from
``DPEngineCoreProc._has_global_unfinished_reqs``, vLLM 0.32.0). After a rank
loss that group has a dead member and its store lives in DP rank 0's engine.
With ``in_engine_rebuild`` the sync runs on the plugin's epoch-scoped engine
group instead (``vllm/engine_group.py``), which follows the workers' rebuilds.
``ParallelConfig.has_unfinished_dp`` (the barrier of a DP-aware resume after a
pause) runs there too, so pause/resume keeps working after a rank loss.
A replacement engine has no vLLM DP group at all (``vllm/replacement.py``).
The engine group is built when an engine's busy loop starts, while every
engine is alive (an engine lost before the first request is then a peer that
closed, not a rendezvous that never completes).
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.vllm.engine_group import current_engine_group, engine_group
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.process_config import process_config

SYNC_DP_STATE = PatchSpec(
    target="vllm.config.parallel:ParallelConfig.sync_dp_state",
    why="The engines' DP sync runs on a group with no timeout whose store lives in rank 0: "
    "after a rank loss it errors (or blocks) and the surviving engines die.",
    how="Run the same SUM all-reduce on the plugin's engine group, which adopts the "
    "workers' agreed members at each new epoch; a failed sync answers 'work remains'.",
    upstream="vllm-project/vllm#39863, #30112",
    remove_when="vLLM's engine DP group can shrink around a lost engine.",
    params=("dp_group", "has_unfinished", "pending_pause"),
)

HAS_UNFINISHED_DP = PatchSpec(
    target="vllm.config.parallel:ParallelConfig.has_unfinished_dp",
    why="A DP-aware resume (after pause_generation) all-reduces over vLLM's DP group, which "
    "has a dead member after a rank loss (and a replacement engine has none).",
    how="Run it as a sync on the plugin's engine group.",
    upstream="vllm-project/vllm#39863, #30112",
    remove_when="vLLM's engine DP group can shrink around a lost engine.",
    params=("dp_group", "has_unfinished"),
    vllm_versions=CHECKED_WITH_0_33,
)

BUSY_LOOP = PatchSpec(
    target="vllm.v1.engine.core:DPEngineCoreProc.run_busy_loop",
    why="Built at the first sync, the engine group's epoch-0 rendezvous waited (for the "
    "group's timeout, 120 s or more) on an engine that had died before the first request; "
    "and the group needs the engine object to hand rank 0's wave duty to a survivor.",
    how="Build the engine group and bind the engine to it when the busy loop starts, "
    "while every engine is alive; then run the stock loop.",
    upstream="vllm-project/vllm#30112",
    remove_when="vLLM's engine DP group can shrink around a lost engine.",
    params=("self",),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (SYNC_DP_STATE, HAS_UNFINISHED_DP, BUSY_LOOP)


def _group_for(dp_group):
    if not process_config().enabled:
        return None
    if dp_group is None:  # a replacement engine (no vLLM DP group)
        return current_engine_group()
    if dp_group.size() < 2:
        return None
    return engine_group(dp_group.rank(), dp_group.size())


def _make_sync_dp_state(original: Callable[..., Any]) -> Callable[..., Any]:
    def sync_dp_state(dp_group, has_unfinished: bool, pending_pause: bool):
        group = _group_for(dp_group)
        if group is None:
            return original(dp_group, has_unfinished, pending_pause)
        return group.sync_state(has_unfinished, pending_pause)

    return sync_dp_state


def _make_has_unfinished_dp(original: Callable[..., Any]) -> Callable[..., Any]:
    def has_unfinished_dp(dp_group, has_unfinished: bool) -> bool:
        group = _group_for(dp_group)
        if group is None:
            return original(dp_group, has_unfinished)
        return group.sync_state(has_unfinished, False)[0]

    return has_unfinished_dp


def _make_run_busy_loop(original: Callable[..., Any]) -> Callable[..., Any]:
    def run_busy_loop(self):
        group = engine_group(self.engine_index, self.dp_size) if process_config().enabled \
            else None
        if group is not None:
            group.bind(self)
        return original(self)

    return run_busy_loop


def apply() -> None:
    apply_patch(SYNC_DP_STATE, _make_sync_dp_state, kind="staticmethod")
    apply_patch(HAS_UNFINISHED_DP, _make_has_unfinished_dp, kind="staticmethod")
    apply_patch(BUSY_LOOP, _make_run_busy_loop)
