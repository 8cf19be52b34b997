"""The TCPStore that carries heartbeats and fault reports of a vLLM deployment.

It must outlive every rank, so the front end (the API server, or the Ray Serve
replica that builds the engine config) hosts it, before any engine process is
spawned, and hands its address to them through the environment
(``VLLM_ELASTIC_FT_STORE``), which engine-core and worker processes inherit.
With ``elastic_ft.store`` set, the front end hosts the store at that address,
or uses the one already listening there.
"""

from __future__ import annotations

import os
from datetime import timedelta

from vllm_elastic_ft.config import ElasticFTConfig
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

STORE_ENV = "VLLM_ELASTIC_FT_STORE"
STORE_HOST_ENV = "VLLM_ELASTIC_FT_STORE_HOST"

_hosted = None  # the TCPStore this process hosts (kept alive for the process's life)


def host_store(config: ElasticFTConfig) -> str | None:
    """Host (or find) the watchdog store and export its address; returns it."""
    global _hosted
    if not (config.enabled and config.watchdog):
        return None
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    import torch.distributed as dist

    if config.store:
        host, _, port = config.store.rpartition(":")
    else:
        host, port = os.environ.get(STORE_HOST_ENV, "127.0.0.1"), "0"
    try:
        _hosted = dist.TCPStore(host, int(port), is_master=True, wait_for_workers=False,
                                timeout=timedelta(seconds=30))
        address = f"{host}:{_hosted.port}"
        logger.info("vllm-elastic-ft watchdog store hosted at %s", address)
    except Exception as err:  # the port is taken: an external store listens there
        if not config.store:
            raise
        address = config.store
        logger.info("vllm-elastic-ft watchdog store: using %s (%s)", address, err)
    os.environ[STORE_ENV] = address
    return address


def store_address() -> str | None:
    """The address this process's front end exported, if any."""
    return os.environ.get(STORE_ENV) or None
