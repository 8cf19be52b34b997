"""The client side of a group's store: how every process connects to it.

The store itself is hosted by the front end (``vllm/watchdog_store.py``, or a
Ray Serve replica); ranks, the front end's follower, the drill and the tests
connect to it here. Fault injection writes through the same client, but lives
in ``faults/`` and is off unless a deployment asks for it.
"""

from __future__ import annotations

from datetime import timedelta

#: How long a client waits to connect and for a ``get`` of a missing key.
DEFAULT_CLIENT_TIMEOUT_S = 10.0


def connect_store(address: str, timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S):
    """A client of the group's TCPStore at ``host:port``."""
    import torch.distributed as dist

    host, _, port = address.rpartition(":")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)
