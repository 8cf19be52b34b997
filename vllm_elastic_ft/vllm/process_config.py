"""This process's :class:`ElasticFTConfig`.

Patched vLLM methods run in engine-core and worker processes. The front end
(API server, or Ray Serve replica) exports the validated config as JSON in
``VLLM_ELASTIC_FT_CONFIG`` before it spawns them (``export_config``), so every
process of the deployment inherits it, whatever vLLM call reaches a patch first.
Without it (a process not started by a patched front end) the settings come
from vLLM's current config, ``VllmConfig.additional_config``, when one is
current at the first call.
"""

from __future__ import annotations

import json
import os

from vllm_elastic_ft.config import CONFIG_KEY, ElasticFTConfig

CONFIG_ENV = "VLLM_ELASTIC_FT_CONFIG"

_process_config: ElasticFTConfig | None = None


def export_config(config: ElasticFTConfig) -> None:
    """Hand ``config`` to the processes this one spawns from now on."""
    os.environ[CONFIG_ENV] = config.to_json()


def process_config() -> ElasticFTConfig:
    """The plugin config of the engine this process belongs to (defaults if none yet)."""
    global _process_config
    if _process_config is None and os.environ.get(CONFIG_ENV):
        _process_config = ElasticFTConfig.from_additional_config(
            {CONFIG_KEY: json.loads(os.environ[CONFIG_ENV])})
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


def in_engine_rebuild_on(world_size: int) -> bool:
    """Whether this process's DP group rebuilds in place: the plugin, its watchdog and
    in-engine rebuild on, a watchdog store exported by the front end, more than one rank."""
    from vllm_elastic_ft.vllm.watchdog_store import store_address

    config = process_config()
    return (config.enabled and config.watchdog and config.in_engine_rebuild
            and store_address() is not None and world_size > 1)
