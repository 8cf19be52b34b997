"""A process that runs only engines for a group whose front end is elsewhere.

On a secondary node of a multi-node DP deployment, vLLM's headless launcher
(``vllm serve --headless``) starts the node's DP ranks and watches them with
the same engine monitor as the API server; stock vLLM 0.32 shuts every local
engine down when one exits. The front end on the head node learns of a lost
rank through the group (a new epoch's members) and routes around it, so here
the other local engines must go on: ``patches/api_server/no_cascade.py`` asks
:func:`tolerates_loss`. The EngineArgs patch marks the process when vLLM builds
a headless engine config (``create_engine_config(headless=True)``); the
launcher is also its node's agent for replacements (``vllm/node_agent.py``).
"""

from __future__ import annotations

from typing import Any

from vllm_elastic_ft.config import ElasticFTConfig

_config: ElasticFTConfig | None = None
_launched: tuple[Any, bool] | None = None


def mark(config: ElasticFTConfig, vllm_config: Any = None, log_stats: bool = True) -> None:
    """This process is a headless launcher, running ``config``; its engines are started
    with ``vllm_config`` (its node agent starts replacements with the same)."""
    global _config, _launched
    _config = config
    _launched = None if vllm_config is None else (vllm_config, log_stats)


def launched_with() -> tuple[Any, bool] | None:
    """``(vllm_config, log_stats)`` this launcher starts its engines with, if marked."""
    return _launched


def tolerates_loss() -> bool:
    """Whether a lost local engine is the group's to heal (headless, in-engine rebuild on)."""
    return _config is not None and _config.enabled and _config.in_engine_rebuild
