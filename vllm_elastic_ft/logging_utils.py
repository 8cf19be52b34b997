"""Loggers for the plugin, under vLLM's logger tree.

vLLM configures handlers and format for the ``vllm`` logger only; naming ours
``vllm.elastic_ft.<module>`` makes plugin lines appear in every vLLM process's
log with vLLM's format (process name, pid, time), without importing vLLM here.
"""

from __future__ import annotations

import logging

_PREFIX = "vllm_elastic_ft."


def get_logger(module_name: str) -> logging.Logger:
    """``get_logger(__name__)`` for a module of this package."""
    short = module_name[len(_PREFIX):] if module_name.startswith(_PREFIX) else module_name
    return logging.getLogger(f"vllm.elastic_ft.{short}")
