"""This process's :class:`ElasticFTConfig`, read from vLLM's current config.

Patched vLLM methods run in engine-core and worker processes, which learn the
plugin's settings only through ``VllmConfig.additional_config``. vLLM makes that
config "current" while it builds communicators, loads the model and profiles,
so the first patched call reads it and every later call reuses it.
"""

from __future__ import annotations

from vllm_elastic_ft.config import ElasticFTConfig

_process_config: ElasticFTConfig | None = None


def process_config() -> ElasticFTConfig:
    """The plugin config of the engine this process belongs to (defaults if none yet)."""
    global _process_config
    if _process_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None:
            return ElasticFTConfig()
        _process_config = ElasticFTConfig.from_additional_config(
            vllm_config.additional_config
        )
    return _process_config


def reset_process_config() -> None:
    """Forget the cached config (tests that build several configs in one process)."""
    global _process_config
    _process_config = None
