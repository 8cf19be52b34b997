"""The TCPStore that carries heartbeats and fault reports of a vLLM deployment.

It must outlive every rank, so the front end (the API server, or the Ray Serve
replica that builds the engine config) hosts it, before any engine process is
spawned, and hands its locator to them through the environment
(``VLLM_ELASTIC_FT_STORE``), which engine-core and worker processes inherit.
With ``elastic_ft.store`` set, the front end hosts the store at that address,
or uses the one already listening there.

The store is private (``comm/store.py``): it listens on the address it
advertises only — loopback by default, ``VLLM_ELASTIC_FT_STORE_HOST`` (the DP
address) when ranks span hosts; torch's ``TCPStore`` server binds every
interface whatever host it is given, so the front end binds the socket itself
and hands it over (``master_listen_fd``) — and every key lives under the
deployment's secret: ``VLLM_ELASTIC_FT_STORE_SECRET`` if the operator set one
(needed to share an external store), else a fresh random one.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from vllm_elastic_ft.comm.store import locator, new_secret, without_secret
from vllm_elastic_ft.config import ElasticFTConfig
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

STORE_ENV = "VLLM_ELASTIC_FT_STORE"
STORE_HOST_ENV = "VLLM_ELASTIC_FT_STORE_HOST"
STORE_SECRET_ENV = "VLLM_ELASTIC_FT_STORE_SECRET"

_hosted = None  # the TCPStore this process hosts (kept alive for the process's life)
_listener: socket.socket | None = None  # its listening socket (bound to one address)


def listen_on(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to ``host`` only (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def host_store(config: ElasticFTConfig) -> str | None:
    """Host (or find) the watchdog store and export its locator; returns it."""
    global _hosted, _listener
    if not (config.enabled and config.watchdog):
        return None
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    import torch.distributed as dist

    if config.store:
        host, _, port = config.store.rpartition(":")
    else:
        host, port = os.environ.get(STORE_HOST_ENV, "127.0.0.1"), "0"
    secret = os.environ.get(STORE_SECRET_ENV) or new_secret()
    try:
        listener = listen_on(host, int(port))
        _hosted = dist.TCPStore(host, listener.getsockname()[1], is_master=True,
                                wait_for_workers=False, timeout=timedelta(seconds=30),
                                master_listen_fd=listener.fileno())
        _listener = listener
        found = locator(host, _hosted.port, secret)
        logger.info("vllm-elastic-ft watchdog store hosted at %s (only there; keys under the "
                    "deployment's secret)", without_secret(found))
    except OSError as err:  # the port is taken: an external store listens there
        if not config.store:
            raise
        found = locator(host, int(port), os.environ.get(STORE_SECRET_ENV))
        logger.info("vllm-elastic-ft watchdog store: using %s (%s)", config.store, err)
    os.environ[STORE_ENV] = found
    return found


def store_address() -> str | None:
    """The store locator this process's front end exported, if any."""
    return os.environ.get(STORE_ENV) or None
