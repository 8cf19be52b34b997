"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once per process (API server, each engine core,
each worker; the DP coordinator excepted), sometimes more than once: it only
applies the patches, each of which is idempotent, and imports vLLM lazily so
that loading the entry point costs nothing until vLLM asks for it.
"""

from __future__ import annotations

from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

_registered = False


def register() -> None:
    """Apply every vllm-elastic-ft patch to this process's vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm_elastic_ft.vllm import patches

    for module in patches.ALL:
        module.apply()
    _registered = True
    logger.debug("vllm-elastic-ft patches applied: %s", [m.__name__ for m in patches.ALL])
