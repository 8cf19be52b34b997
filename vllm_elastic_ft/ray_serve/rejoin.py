"""Rejoin in place on Ray Serve: the replica of a lost rank brings its rank back into the gang.

Ray Serve (2.60) restarts only whole gangs (``GangRuntimeFailurePolicy.RESTART_REPLICA``
raises ``NotImplementedError``), and the lost rank's replica stays up after the gang
healed around it (it forwards what reaches it). So that replica starts a new engine
for its rank and has the gang admit it, with the same admission as ``POST
/elastic_ft/replace`` under ``vllm serve`` (every engine runs ``elastic_ft_admit``: the
workers agree on a new epoch with the joiner, which brings vLLM's expert layout back).
Under ``vllm serve`` one front end drives every engine; on Ray each replica drives its
own, so the admission is posted in the gang's store:

1. :func:`start_replacement` (the joiner, off the event loop): a replacement engine
   core (``vllm/replacement.start_engine``) for the rank, connected to a new engine
   client of the replica's own (vLLM's ``AsyncLLM`` with ``client_addresses``: it
   launches nothing) and to the gang's DP coordinator, whose addresses rank 0
   published at start-up (:func:`publish_coordinator`);
2. the joiner posts admission ``n`` (``keys.serve_admission``) and runs its part;
3. every live replica (:class:`AdmissionWatcher`) pauses its engine — vLLM's
   DP-aware pause, mode ``keep``: running requests freeze, new ones queue, none
   fails — runs ``elastic_ft_admit`` and resumes; each writes its answer;
4. the joiner's server swaps the new engine in and routes to it again.

A failed attempt kills the half-started engine; the gang keeps serving without the
rank (the workers' admission is bounded by ``rebuild_budget_s``). Targets ray 2.60
(``VLLMEngine``) and vLLM 0.32 (``AsyncLLM``, ``DPEngineCoreProc``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

#: How often a live replica looks for a posted admission.
POLL_S = 0.1


# ------------------------------------------------------------- rank 0's coordinator
def publish_coordinator(store, engine_client) -> Any:
    """On rank 0: publish the gang's DP coordinator addresses, and take the coordinator out
    of the engine client's resources so that it outlives rank 0's engine (vLLM shuts the
    client down, coordinator included, when its only engine exits; the other ranks'
    engines need it for their DP waves). Returns the coordinator (the replica owns it)."""
    client = engine_client.engine_core
    coordinator = client.resources.coordinator
    if coordinator is None:
        return None
    engine_input, engine_output = coordinator.get_engine_socket_addresses()
    store.set(keys.serve_coordinator(), json.dumps({
        "input": engine_input, "output": engine_output,
        "stats": coordinator.get_stats_publish_address()}))
    client.resources.coordinator = None
    return coordinator


# ------------------------------------------------------------------- the joiner
class Replacement:
    """A replacement engine for one rank and the engine client that talks to it."""

    def __init__(self, process, llm):
        self.process, self.llm = process, llm
        self._watch = threading.Thread(target=self._watch_process, daemon=True,
                                       name="elastic-ft-replacement-monitor")
        self._watch.start()

    def _watch_process(self) -> None:
        """No engine manager watches an engine the client did not launch: if it exits, do
        what vLLM's own monitor does (``MPClient.start_engine_core_monitor``, 0.32): mark
        the client dead and shut it down — closing its sockets is what ends each running
        request with ``EngineDeadError`` (the server then finishes it elsewhere)."""
        self.process.join()
        client = self.llm.engine_core
        if client.resources.engine_dead:
            return
        logger.warning("replacement engine (pid %d) exited with code %s", self.process.pid,
                       self.process.exitcode)
        client.resources.engine_dead = True
        client.shutdown()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.llm.shutdown()


def start_replacement(old_llm, rank: int, coordinator: dict) -> Replacement:
    """Start a new engine core for DP ``rank`` with the lost engine's config, and a new
    engine client for it. Blocking (the model loads): run it off the event loop."""
    from vllm.utils.network_utils import get_open_zmq_ipc_path
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.utils import EngineZmqAddresses
    from vllm.v1.executor import Executor

    from vllm_elastic_ft.vllm.replacement import start_engine

    config = old_llm.vllm_config
    inputs, outputs = get_open_zmq_ipc_path(), get_open_zmq_ipc_path()
    addresses = EngineZmqAddresses(
        inputs=[inputs], outputs=[outputs], coordinator_input=coordinator["input"],
        coordinator_output=coordinator["output"],
        frontend_stats_publish_address=coordinator["stats"])
    executor = Executor.get_class(config)
    process = start_engine(addresses, config, executor, old_llm.log_stats, rank, local_rank=0)
    try:
        # The engine has connected to these addresses already: the client binds them
        # (ZMQ delivers what the engine queued) and launches nothing itself.
        llm = AsyncLLM(vllm_config=config, executor_class=executor,
                       log_stats=old_llm.log_stats,
                       client_addresses={"input_address": inputs, "output_address": outputs,
                                         "stats_update_address": coordinator["stats"]})
    except BaseException:
        process.kill()
        raise
    return Replacement(process, llm)


async def admit_replacement(store, replacement: Replacement, rank: int,
                            timeout_s: float) -> list[int]:
    """Post the admission of ``rank`` and run the joiner's part; returns the new members.

    Raises TimeoutError or RuntimeError; the gang then goes on without ``rank``.
    """
    client = replacement.llm.engine_core
    await asyncio.wait_for(client.call_utility_async("elastic_ft_prepare_join"), timeout_s)
    ticket = f"{rank}-{uuid.uuid4().hex[:8]}"
    number = await asyncio.to_thread(store.add, keys.serve_admissions(), 1)
    await asyncio.to_thread(store.set, keys.serve_admission(number),
                            json.dumps({"rank": rank, "ticket": ticket}))
    logger.warning("rank %d: admission %d posted (ticket %s)", rank, number, ticket)
    epoch, members = await asyncio.wait_for(
        client.call_utility_async("elastic_ft_admit", rank, ticket, 0), timeout_s)
    # A DP-aware resume is a barrier of the new epoch's engines: the live ones resume too.
    await asyncio.wait_for(replacement.llm.resume_generation(), timeout_s)
    if rank not in members:
        raise RuntimeError(f"rank {rank} was not admitted (members {members})")
    answers = await asyncio.to_thread(_answers, store, number, rank, members, 10.0)
    logger.warning("rank %d admitted at epoch %d: members %s (live replicas: %s)", rank,
                   epoch, members, answers)
    return list(members)


def _answers(store, number: int, joiner: int, members, timeout_s: float) -> dict:
    """The live replicas' answers to admission ``number`` (for the log; bounded wait)."""
    wanted = [keys.serve_admission_done(number, r) for r in members if r != joiner]
    deadline = time.monotonic() + timeout_s
    while not store.check(wanted) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {key.rsplit("/", 1)[-1]: json.loads(store.get(key)) for key in wanted
            if store.check([key])}


# -------------------------------------------------------------- live replicas
class AdmissionWatcher:
    """A live replica's side: run its engine's part of every admission posted in the store.

    ``engine_llm`` returns the replica's current ``AsyncLLM`` (or None while it has none
    that serves); ``is_member`` says whether this rank is in the gang's current members.
    """

    def __init__(self, store, rank: int, engine_llm, is_member, timeout_s: float):
        self.store, self.rank = store, rank
        self.engine_llm, self.is_member = engine_llm, is_member
        self.timeout_s = timeout_s
        self.seen = 0
        self.admitted: list[dict] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        # Admissions posted before this replica started are history.
        self.seen = await asyncio.to_thread(self.store.add, keys.serve_admissions(), 0)
        while True:
            await asyncio.sleep(POLL_S)
            try:
                posted = await asyncio.to_thread(self.store.add, keys.serve_admissions(), 0)
            except Exception as err:  # noqa: BLE001 - the store host may be gone: retry
                logger.warning("rank %d: admission watch cannot read the store (%s)",
                               self.rank, err)
                await asyncio.sleep(1.0)
                continue
            while self.seen < posted:
                self.seen += 1
                await self._take_part(self.seen)

    async def _take_part(self, number: int) -> None:
        request = json.loads(await asyncio.to_thread(self.store.get,
                                                     keys.serve_admission(number)))
        joiner, ticket = int(request["rank"]), request["ticket"]
        llm = self.engine_llm()
        if joiner == self.rank or llm is None or not self.is_member():
            return  # the joiner runs its own part; a lost replica has none
        answer: dict[str, Any]
        started = time.monotonic()
        try:
            await asyncio.wait_for(llm.pause_generation(mode="keep", clear_cache=False),
                                   self.timeout_s)
            try:
                epoch, members = await asyncio.wait_for(llm.engine_core.call_utility_async(
                    "elastic_ft_admit", joiner, ticket, 0), self.timeout_s)
            finally:
                await asyncio.wait_for(llm.resume_generation(), self.timeout_s)
            answer = {"ok": True, "epoch": epoch, "members": list(members),
                      "paused_s": round(time.monotonic() - started, 3)}
        except Exception as err:  # noqa: BLE001 - answered in the store, logged
            logger.exception("rank %d: admission %d of rank %d failed", self.rank, number,
                             joiner)
            answer = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
        self.admitted.append({"number": number, "joiner": joiner, **answer})
        await asyncio.to_thread(self.store.set, keys.serve_admission_done(number, self.rank),
                                json.dumps(answer))
