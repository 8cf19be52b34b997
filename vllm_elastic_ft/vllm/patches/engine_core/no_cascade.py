"""One engine's death no longer takes the whole deployment down: the engine core's side.

Stock vLLM 0.32.0: a dying engine's ``ENGINE_CORE_DEAD`` frame marks the whole
DP client dead (``BackgroundResources.validate_alive``). An engine leaving a
group that rebuilds in place does not send it (it is not the client's death;
the API server's monitor, ``patches/api_server/no_cascade.py``, sees the
process exit).
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.process_config import process_config

logger = get_logger(__name__)

SEND_ENGINE_DEAD = PatchSpec(
    target="vllm.v1.engine.core:EngineCoreProc._send_engine_dead",
    why="ENGINE_CORE_DEAD from any one engine marks the whole DP client dead.",
    how="Skip the frame when this engine belongs to a DP group that rebuilds in place.",
    upstream="vllm-project/vllm#39863",
    remove_when="vLLM tolerates the loss of one DP engine.",
    params=("self",),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (SEND_ENGINE_DEAD,)


def _make_send_engine_dead(original: Callable[..., Any]) -> Callable[..., Any]:
    def _send_engine_dead(self) -> None:
        config = process_config()
        dp_size = self.vllm_config.parallel_config.data_parallel_size \
            if hasattr(self, "vllm_config") else 1
        if config.enabled and config.in_engine_rebuild and config.watchdog and dp_size > 1:
            logger.warning("engine leaving its DP group; not sending ENGINE_CORE_DEAD (the "
                           "group rebuilds without it)")
            return None
        return original(self)

    return _send_engine_dead


def apply() -> None:
    apply_patch(SEND_ENGINE_DEAD, _make_send_engine_dead)
