"""The client side of a group's store: how every process connects to it.

The store itself is hosted by the front end (``vllm/watchdog_store.py``, or a
Ray Serve replica); ranks, the front end's follower, the drill and the tests
connect to it here. Fault injection writes through the same client, but lives
in ``faults/`` and is off unless a deployment asks for it.

A store is named by a *locator*, ``secret@host:port`` (or ``host:port`` for a
store with no secret, e.g. a test harness's own). torch's ``TCPStore`` has no
authentication and no access control, and no command that lists keys: a client
must name a key to read or write it. So every key of a deployment lives under
its secret (a ``PrefixStore``): a process that can reach the port but was not
given the secret cannot read, write, or even find the group's heartbeats,
fences or fault-injection knobs. The secret travels only in the environment the
front end hands to its own engine and worker processes, and, on Ray Serve, in
Ray's internal key-value store (readable only from inside the Ray cluster).
"""

from __future__ import annotations

import secrets
from datetime import timedelta

#: How long a client waits to connect and for a ``get`` of a missing key.
DEFAULT_CLIENT_TIMEOUT_S = 10.0


def new_secret() -> str:
    """A deployment's store secret (128 random bits, hex)."""
    return secrets.token_hex(16)


def locator(host: str, port: int, secret: str | None) -> str:
    """``secret@host:port`` (``host:port`` without a secret)."""
    return f"{secret}@{host}:{port}" if secret else f"{host}:{port}"


def parse_locator(value: str) -> tuple[str | None, str, int]:
    """``(secret or None, host, port)`` of a locator; raises ValueError naming it if bad."""
    secret, _, address = value.rpartition("@")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("a store locator is 'secret@host:port' or 'host:port', got "
                         f"{without_secret(value)!r}")
    return secret or None, host, int(port)


def without_secret(value: str) -> str:
    """A locator as logs and status may show it: the address, never the secret."""
    return value.rpartition("@")[2]


def connect_store(store_locator: str, timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S):
    """A client of the group's TCPStore named by ``store_locator`` (see the module docs)."""
    import torch.distributed as dist

    secret, host, port = parse_locator(store_locator)
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return dist.PrefixStore(f"{secret}/", store) if secret else store
