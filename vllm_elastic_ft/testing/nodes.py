"""Simulated nodes: the ranks of one deployment split over "machines" on one host.

Each node is a network namespace on a bridge this module creates (its own
address, its own loopback), and every process started on it runs in a PID
namespace of its own, with its own ``/proc``: a rank there cannot see, probe
or signal the processes of another node, as on separate machines. The test
process stays in the host's namespaces and reaches the nodes through the
bridge (the host's address on it is ``.254``); no traffic leaves the host.

Partitions: :meth:`SimulatedNodes.cut` takes a node's link down (its processes
live on, unreachable), :meth:`heal` brings it back.

Needs root, ``ip`` (iproute2) and ``unshare`` (util-linux); :func:`unavailable`
says why not, for tests to skip with. The deployment runs with vLLM's own
multi-node DP (``--data-parallel-size-local``, ``--data-parallel-address``,
``--data-parallel-rpc-port``, ``--headless`` on the secondary nodes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def unavailable() -> str | None:
    """Why simulated nodes cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "simulated nodes need root (network and PID namespaces)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"simulated nodes need {tool!r}, which is not installed"
    probe = f"eftprobe{uuid.uuid4().hex[:6]}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        pid_ns = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--pid", "--fork",
                                 "--mount-proc", "true"], capture_output=True, text=True,
                                timeout=30)
        if pid_ns.returncode != 0:
            return f"cannot create a PID namespace: {pid_ns.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Node:
    name: str  # its network namespace
    address: str  # its address on the bridge
    host_link: str  # the bridge end of its veth pair (down = the node is cut off)
    interface: str  # its end, inside the node
    processes: list[subprocess.Popen] = field(default_factory=list)


class SimulatedNodes:
    """``count`` nodes on a private bridge. Use as a context manager."""

    def __init__(self, count: int, subnet: int | None = None):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        tag = uuid.uuid4().hex[:5]
        # 10.213.<subnet>.0/24: a private range; the subnet keeps parallel runs apart.
        self.subnet = subnet if subnet is not None else int(tag, 16) % 250 + 1
        self.bridge = f"eftbr{tag}"
        self.host_address = f"10.213.{self.subnet}.254"
        self.nodes = [Node(f"eft{tag}n{i}", f"10.213.{self.subnet}.{i + 1}", f"eftv{tag}{i}h",
                           f"eftv{tag}{i}n") for i in range(count)]

    def __enter__(self) -> SimulatedNodes:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for node in self.nodes:
                inner = node.interface
                _ip("netns", "add", node.name)
                _ip("link", "add", node.host_link, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", node.name)
                _ip("link", "set", node.host_link, "master", self.bridge)
                _ip("link", "set", node.host_link, "up")
                _ip("-n", node.name, "addr", "add", f"{node.address}/24", "dev", inner)
                _ip("-n", node.name, "link", "set", inner, "up")
                _ip("-n", node.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            for proc in node.processes:
                if proc.poll() is None:
                    proc.kill()  # unshare --kill-child takes the node's processes with it
                    proc.wait(timeout=30)
            _ip("netns", "del", node.name, check=False)
            _ip("link", "del", node.host_link, check=False)
        _ip("link", "del", self.bridge, check=False)

    # ------------------------------------------------------------ processes
    def popen(self, index: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on node ``index``: in its network namespace, in a new PID namespace
        (with its own /proc). Killing the returned process ends every process it started.

        Gloo is told the node's interface (``GLOO_SOCKET_IFNAME``, as an operator sets it on
        a real multi-node deployment): its default is the address the host name resolves
        to, loopback here, which no other node can reach."""
        node = self.nodes[index]
        kwargs["env"] = {**(kwargs.get("env") or os.environ), "GLOO_SOCKET_IFNAME": node.interface}
        wrapped = ["ip", "netns", "exec", node.name, "unshare", "--pid", "--fork",
                   "--kill-child", "--mount-proc", *argv]
        proc = subprocess.Popen(wrapped, **kwargs)
        node.processes.append(proc)
        return proc

    # ----------------------------------------------------------- partitions
    def cut(self, index: int) -> None:
        """Take node ``index``'s link down: its processes live on, unreachable."""
        _ip("link", "set", self.nodes[index].host_link, "down")
        logger.warning("simulated node %s cut off", self.nodes[index].name)

    def heal(self, index: int) -> None:
        _ip("link", "set", self.nodes[index].host_link, "up")
        logger.warning("simulated node %s linked again", self.nodes[index].name)
