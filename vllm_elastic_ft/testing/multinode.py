"""One vLLM deployment over simulated nodes, with vLLM's own multi-node data parallelism.

The head node (node 0) runs the API server with the first ``ranks_per_node`` DP
ranks (``--data-parallel-size-local``) and hosts the watchdog store at its DP
address; every other node runs vLLM's headless launcher (``--headless
--data-parallel-start-rank``) for its ranks, pointed at the head's DP address
and RPC port, and at the store through ``VLLM_ELASTIC_FT_STORE`` (the
deployment's locator, secret included). Nothing here launches engines itself:
vLLM does, as on real machines.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from functools import partial
from pathlib import Path

import psutil

from vllm_elastic_ft.comm.store import locator
from vllm_elastic_ft.testing.harness import free_port
from vllm_elastic_ft.testing.nodes import SimulatedNodes
from vllm_elastic_ft.testing.server import ServerSpec, VLLMServer
from vllm_elastic_ft.vllm.watchdog_store import STORE_ENV


class MultiNodeServer:
    """``spec.data_parallel_size`` ranks, ``ranks_per_node`` on each node of ``nodes``."""

    def __init__(self, nodes: SimulatedNodes, spec: ServerSpec, ranks_per_node: int,
                 log_dir: str | os.PathLike):
        if spec.data_parallel_size != ranks_per_node * len(nodes.nodes):
            raise ValueError(f"data_parallel_size ({spec.data_parallel_size}) must be "
                             f"ranks_per_node ({ranks_per_node}) x nodes ({len(nodes.nodes)})")
        self.nodes = nodes
        self.ranks_per_node = ranks_per_node
        self.log_dir = Path(log_dir)
        self.rpc_port = free_port()
        head = nodes.nodes[0].address
        self.multi_node_args = ["--data-parallel-size-local", str(ranks_per_node),
                                "--data-parallel-address", head,
                                "--data-parallel-rpc-port", str(self.rpc_port)]
        self.spec = replace(spec, host=head,
                            extra_args=list(spec.extra_args) + self.multi_node_args)
        self.head = VLLMServer(self.spec, self.log_dir / "node0.log",
                               popen=partial(nodes.popen, 0))
        self.secondaries = []

    @property
    def url(self) -> str:
        return self.head.url

    @property
    def store(self) -> str:
        return self.head.store

    def start(self) -> MultiNodeServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.head.start()
        for index in range(1, len(self.nodes.nodes)):
            argv = self.spec.argv(self.head.port)
            argv[1:3] = ["-m", "vllm_elastic_ft.testing.headless"]  # vLLM's run_headless
            argv += ["--data-parallel-start-rank", str(index * self.ranks_per_node)]
            env = self.spec.environ()
            env[STORE_ENV] = locator(self.spec.host, self.head.store_port,
                                     self.head.store_secret)
            with open(self.log_dir / f"node{index}.log", "wb") as log:
                self.secondaries.append(self.nodes.popen(
                    index, argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True))
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        return self.head.wait_ready(timeout_s)

    def stop(self) -> None:
        for proc in self.secondaries:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        self.head.stop()

    def __enter__(self) -> MultiNodeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        """Every node's log, head first."""
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob("*.log")))

    # ------------------------------------------------------------- processes
    def ranks_on(self, node: int) -> list[int]:
        """The DP ranks ``node``'s vLLM launcher starts."""
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def root_pid(self, node: int) -> int:
        """The host-namespace pid of ``node``'s vLLM launcher (API server or headless)."""
        return (self.head.proc if node == 0 else self.secondaries[node - 1]).pid

    def worker_pid(self, rank: int, node: int | None = None) -> int:
        """The host-namespace pid of DP rank ``rank``'s worker (``VLLM::Worker_DP<rank>...``)
        among the processes of ``node``'s vLLM launcher (default: the node that started
        the rank): the node's own pid for it means nothing outside that node."""
        if node is None:
            node = rank // self.ranks_per_node
        for proc in psutil.Process(self.root_pid(node)).children(recursive=True):
            try:
                if proc.name().startswith(f"VLLM::Worker_DP{rank}"):
                    return proc.pid
            except psutil.Error:
                continue
        raise LookupError(f"no worker process of DP rank {rank} on node {node}")
