"""Let a replacement DP rank's engine core start beside a running group; let engines admit it.

The patch changes nothing in an ordinary engine core: it acts only in a
process started by ``vllm/replacement.py`` (``VLLM_ELASTIC_FT_REPLACES_RANK``
set). Two engine-core utility methods are added: ``elastic_ft_prepare_join``
(on the replacement) and ``elastic_ft_admit``, which the front end calls on
every engine (vLLM 0.32.0 runs a utility call on the engine's busy-loop thread,
between steps). The replacement's worker side is ``patches/worker/replacement.py``.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.replacement import (
    admit_in_worker, prepare_join_in_worker, replaced_rank,
)

logger = get_logger(__name__)

STATELESS_DP_GROUP = PatchSpec(
    target="vllm.config.parallel:ParallelConfig.stateless_init_dp_group",
    why="A DP engine core joins a rendezvous of all N engines at start-up; the running "
    "engines of a group never attend one again, so a replacement would wait forever.",
    how="In a replacement engine only: no vLLM DP group (None); the engine's DP sync runs "
    "on the plugin's engine group.",
    upstream="vllm-project/vllm#30112 (keep survivors when a DP process dies)",
    remove_when="vLLM can add an engine to a running DP group.",
    params=("self", "return_store"),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (STATELESS_DP_GROUP,)


def _make_stateless_init_dp_group(original: Callable[..., Any]) -> Callable[..., Any]:
    def stateless_init_dp_group(self, return_store: bool = False):
        if replaced_rank() is None:
            return original(self, return_store)
        logger.warning("replacement engine for DP rank %s: no vLLM DP group (the plugin's "
                       "engine group syncs it once admitted)", replaced_rank())
        return (None, None) if return_store else None

    return stateless_init_dp_group


def elastic_ft_prepare_join(self) -> bool:
    """Engine-core utility, on a replacement before its admission: build the worker's and
    the engine's group objects now, so the admission (the group is paused) is short."""
    from vllm_elastic_ft.vllm.engine_group import engine_group

    self.model_executor.collective_rpc(prepare_join_in_worker)
    return engine_group(self.engine_index, self.dp_size) is not None


def elastic_ft_admit(self, joiner: int, ticket: str, wave: int) -> list:
    """Engine-core utility: admit ``joiner`` into the DP group (this engine's share).

    Every live engine and the joiner's engine run it at the same time, while
    the live ones are paused (vLLM's DP-aware pause): each engine's worker
    agrees on the new epoch (``WorkerGroup.admit``), then the engines' DP sync
    moves to that epoch. The joiner starts in the live engines' wave, as an
    engine that has just paused. Returns ``[epoch, members]``.
    """
    from vllm_elastic_ft.vllm.engine_group import engine_group

    epoch, members = self.model_executor.collective_rpc(admit_in_worker,
                                                        args=(joiner, ticket))[0]
    group = engine_group(self.engine_index, self.dp_size)
    if group is None:
        raise RuntimeError("no elastic engine group in this engine (in_engine_rebuild off?)")
    group.bind(self)
    group.admitted()
    if self.engine_index == joiner:
        self.current_wave = max(self.current_wave, wave)
        self.step_counter = 0
        self.engines_running = False
        # The coordinator still holds the lost engine's last request counts (the
        # balancer would keep avoiding this rank): publish ours at the next step.
        self.last_counts = None
    logger.warning("engine %d: DP rank %d admitted; members %s", self.engine_index, joiner,
                   members)
    return [epoch, members]


def apply() -> None:
    apply_patch(STATELESS_DP_GROUP, _make_stateless_init_dp_group)
    from vllm.v1.engine.core import DPEngineCoreProc

    for method in (elastic_ft_prepare_join, elastic_ft_admit):  # engine-core utilities
        if not hasattr(DPEngineCoreProc, method.__name__):
            setattr(DPEngineCoreProc, method.__name__, method)
