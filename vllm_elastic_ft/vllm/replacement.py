"""A replacement DP rank: a fresh engine core and worker that join a running group.

After the group shrank around lost DP rank ``k``, the API server can start a new
engine process for ``k`` (``POST /elastic_ft/replace``). It is vLLM's own
engine core (``EngineCoreProc.run_engine_core``, the same start-up handshake
with the front end, its own worker, model load and warm-up), with three
differences, all keyed on ``VLLM_ELASTIC_FT_REPLACES_RANK``, which this
module sets in the new engine process (its worker inherits it):

* the engine skips vLLM's stateless DP group: that is a rendezvous of all N
  engines at start-up, which the running engines will never attend again; its
  DP sync runs on the plugin's engine group once it is admitted;
* the worker builds its torch.distributed world alone (vLLM's DP and EP
  coordinators of size 1), then tells them their logical DP rank and size
  (``k`` of N), so the model loads rank ``k``'s experts; every DP collective
  already runs on the plugin's group, never on those coordinators;
* until admitted, the worker's collectives are local (the other ranks count 0
  tokens), which is all warm-up needs.

Admission is :meth:`FrontEndRecovery.replace`'s job (the front end pauses the
live engines with vLLM's DP-aware pause, mode ``keep``, and asks every engine
to run ``elastic_ft_admit``). Targets vLLM 0.32.0 (CPU, TP=1).
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
from typing import Any

from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

REPLACES_ENV = "VLLM_ELASTIC_FT_REPLACES_RANK"


def replaced_rank() -> int | None:
    """The DP rank this process replaces, or None in an ordinary process."""
    value = os.environ.get(REPLACES_ENV, "")
    return int(value) if value else None


# ------------------------------------------------------------- engine process
def run_engine_core(rank: int, engine_kwargs: dict[str, Any], local_rank: int | None = None
                    ) -> None:
    """Process target of a replacement engine: mark it, load the plugin, run vLLM's engine."""
    os.environ[REPLACES_ENV] = str(rank)
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # the patches must be in before the engine builds its DP state
    from vllm.v1.engine.core import EngineCoreProc

    EngineCoreProc.run_engine_core(dp_rank=rank,
                                   local_dp_rank=rank if local_rank is None else local_rank,
                                   **engine_kwargs)


def engine_addresses(client):
    """The ZMQ addresses a new engine of ``client`` (vLLM's DP client) must connect to."""
    import zmq
    from vllm.v1.engine.utils import EngineZmqAddresses

    addresses = EngineZmqAddresses(
        inputs=[client.input_socket.getsockopt(zmq.LAST_ENDPOINT).decode()],
        outputs=[client.resources.output_socket.getsockopt(zmq.LAST_ENDPOINT).decode()])
    coordinator = client.resources.coordinator
    if coordinator is not None:
        addresses.coordinator_input, addresses.coordinator_output = \
            coordinator.get_engine_socket_addresses()
        addresses.frontend_stats_publish_address = coordinator.get_stats_publish_address()
    return addresses


def launch_engine(client, vllm_config, executor_class, log_stats: bool, rank: int):
    """Start a replacement engine core for DP ``rank`` beside the API server's DP client
    ``client``; returns once it is loaded and warm (see :func:`start_engine`)."""
    import zmq

    # The new engine connects with the lost one's routing id; without handover
    # the client's ROUTER keeps routing it to a dead (or stuck) peer's pipe.
    client.input_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
    return start_engine(engine_addresses(client), vllm_config, executor_class, log_stats, rank)


def start_engine(addresses, vllm_config, executor_class, log_stats: bool, rank: int,
                 local_rank: int | None = None):
    """Start a replacement engine core for DP ``rank`` that talks to the front end at
    ``addresses`` (vLLM's ``EngineZmqAddresses``: its client's input/output sockets and the
    DP coordinator's); returns its process once it is loaded and warm.

    Blocking (run it off the event loop). Raises RuntimeError if the process dies
    during start-up (vLLM's own start-up barrier watches it).
    """
    import zmq
    from vllm.utils.network_utils import get_open_zmq_ipc_path, zmq_socket_ctx
    from vllm.v1.engine.utils import (
        CoreEngine, CoreEngineLaunch, CoreEngineProcManager, wait_for_engine_startup,
    )

    if vllm_config.parallel_config.tensor_parallel_size != 1:
        raise RuntimeError("replacing a DP rank supports tensor_parallel_size=1 only")
    handshake_address = get_open_zmq_ipc_path()
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_core, name=f"EngineCore_DP{rank}",
        kwargs={"rank": rank, "local_rank": rank if local_rank is None else local_rank,
                "engine_kwargs": {
                    "vllm_config": vllm_config, "local_client": True,
                    "handshake_address": handshake_address, "executor_class": executor_class,
                    "log_stats": log_stats}})
    with zmq_socket_ctx(handshake_address, zmq.ROUTER, bind=True) as handshake_socket:
        process.start()
        logger.warning("replacement engine for DP rank %d started (pid %d)", rank, process.pid)
        # vLLM's start-up barrier, for this one engine: it watches the process
        # list of a CoreEngineProcManager, so give it one holding just ours.
        manager = CoreEngineProcManager.__new__(CoreEngineProcManager)
        manager.processes = [process]
        parallel_config = copy.copy(vllm_config.parallel_config)
        parallel_config.data_parallel_size_local = 1
        wait_for_engine_startup(handshake_socket, [CoreEngine(index=rank)], parallel_config,
                                False, vllm_config.cache_config,
                                CoreEngineLaunch(manager, None, addresses, None))
    return process


# ------------------------------------------------------------- worker process
@contextlib.contextmanager
def alone_in_world(parallel_config):
    """vLLM builds its torch.distributed world and groups as if DP were 1."""
    size = parallel_config.data_parallel_size
    parallel_config.data_parallel_size = 1
    try:
        yield
    finally:
        parallel_config.data_parallel_size = size


def take_logical_dp_rank(rank: int, world: int, enable_expert_parallel: bool) -> None:
    """Make vLLM's DP/EP coordinators (size 1) act as DP rank ``rank`` of ``world``.

    They carry no traffic: the plugin's patches route every DP collective of
    their communicators to the worker group. The model reads its EP rank from
    them, and the MoE all-to-all needs a communicator with an all2all manager,
    which vLLM gives no group of one.
    """
    from vllm.distributed import parallel_state as ps
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    communicator_cls = resolve_obj_by_qualname(current_platform.get_device_communicator_cls())
    for coordinator in (ps._DP, ps._EP):  # DP first: EP's all2all manager reads the DP size
        if coordinator is None:
            continue
        coordinator.rank_in_group, coordinator.world_size = rank, world
        if coordinator.device_communicator is None:
            coordinator.device_communicator = communicator_cls(
                cpu_group=coordinator.cpu_group, device=coordinator.device,
                device_group=coordinator.device_group, unique_name=coordinator.unique_name,
                use_all2all=coordinator is ps._EP and enable_expert_parallel)
        communicator = coordinator.device_communicator
        communicator.rank_in_group, communicator.world_size = rank, world
    logger.warning("replacement worker: DP/EP rank %d of %d (world of its own)", rank, world)


def prepare_in_worker(worker):
    """``collective_rpc`` target: this worker's group, with the model attached."""
    from vllm_elastic_ft.vllm.worker_group import attached_worker_group

    group = attached_worker_group(worker)
    if group is None:
        raise RuntimeError("no elastic DP group in this worker (in_engine_rebuild off?)")
    return group


def prepare_join_in_worker(worker) -> None:
    """``collective_rpc`` target on a replacement, before its admission."""
    prepare_in_worker(worker)


def admit_in_worker(worker, joiner: int, ticket: str) -> list:
    """``collective_rpc`` target: this worker's part of admitting ``joiner``."""
    membership = prepare_in_worker(worker).admit(joiner, ticket)
    return [membership.epoch, list(membership.members)]
