"""The API server's side of an in-engine rebuild: route around lost engines, lose no request.

One object per API-server process. It learns that DP rank ``k`` is lost from
either of two sources — its engine process exited (``monitor_engine_liveness``
patch) or the group's members at a new epoch leave it out (the store follower,
via :meth:`FrontEndRecovery.exclude`) — and then, on the AsyncLLM event loop:

1. stops routing to ``k`` (``patches/api_server/request_routing.py`` skips lost engines;
   utility calls go to live engines only);
2. re-submits every request that was in flight on ``k`` to a live engine, as a
   continuation: prompt + the tokens already streamed to the client, with
   ``max_tokens`` (and ``min_tokens``) lowered by as many. The request keeps its
   id, so the client's stream just goes on; anything ``k`` still sends for it
   is dropped. Output-token penalties and per-request seeds restart from the
   continuation point (documented limit). A request that cannot go on is
   finished at once, as its engine would have finished it (``_end``): with
   ``length`` when its client already has every token of its budget, with
   vLLM's retryable request-level error (finish reason ``error``: the OpenAI
   server answers 500, or ends the stream with an error event) when it could
   not be re-submitted; its client never waits for an engine that is gone.

Requests are cached (the ``EngineCoreRequest`` the client sent) from routing to
completion, since vLLM's front end keeps only part of a request.

:meth:`FrontEndRecovery.replace` brings a lost rank back: it starts a
replacement engine (``vllm/replacement.py``) on the node that lost the rank
(here, or through that node's agent, ``vllm/node_agent.py``), pauses the live engines (vLLM's
DP-aware pause, mode ``keep``: nothing is aborted, new requests queue), has
every engine admit the replacement (``elastic_ft_admit``), routes to it again
and resumes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, Callable

from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.continuation import remaining_budget

logger = get_logger(__name__)


class _Replacement:
    """A replacement engine started for a lost rank: here (``process``) or on its node
    (``stop`` asks that node's agent to stop it)."""

    def __init__(self, pid: int, node: str, process: Any = None,
                 stop: Callable[[], None] | None = None):
        self.pid, self.node, self.process, self.stop_remote = pid, node, process, stop

    def stop(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
        elif self.stop_remote is not None:
            self.stop_remote()


class FrontEndRecovery:
    def __init__(self, min_live_ranks: int = 1) -> None:
        self.min_live_ranks = min_live_ranks
        self.lost: set[int] = set()
        self.requests: dict[str, Any] = {}  # request id -> EngineCoreRequest, until finished
        self.moved: set[str] = set()  # re-submitted: the lost engine's late outputs are dropped
        self.resubmitted = 0
        #: Stranded requests ended with an error: not re-submitted (it raised, or
        #: nothing was kept to continue them from).
        self.failed_resubmissions = 0
        #: Stranded requests ended with ``length``: their client had their whole budget.
        self.ended_at_budget = 0
        self.events: list[dict] = []
        self.client = None
        self.llm = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        #: True while a replacement is being admitted (the group is paused, not broken).
        self.admitting = False
        self._replacing: int | None = None
        self.replacements: dict[int, _Replacement] = {}  # rank -> its replacement engine
        #: The front end's view of the group (set by the endpoint plugin).
        self.group_view = None

    # ------------------------------------------------------------- binding
    def bind_client(self, client) -> None:
        """The DP load-balancing client (called on the event loop, at the first request)."""
        if self.client is None:
            self.client = client
            self.loop = asyncio.get_running_loop()

    def bind_llm(self, llm) -> None:
        """The AsyncLLM (its output processor holds what each request generated so far)."""
        self.llm = llm

    # ---------------------------------------------------------- lost ranks
    def engine_exited(self, rank: int, exitcode: int | None) -> None:
        """An engine process exited (called from vLLM's engine monitor thread)."""
        self._lose(rank, f"engine process exited with code {exitcode}")

    def exclude(self, ranks, reason: str) -> None:
        """The group's agreed members leave ``ranks`` out (called from the store follower)."""
        for rank in ranks:
            self._lose(rank, reason)

    def _lose(self, rank: int, reason: str) -> None:
        with self._lock:
            if rank in self.lost:
                return
            self.lost.add(rank)
        self.events.append({"t": time.time(), "event": "rank_lost", "rank": rank,
                            "reason": reason})
        logger.warning("front end: DP rank %d lost (%s); routing around it", rank, reason)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._move_requests(rank)))

    def is_lost(self, index: int) -> bool:
        return index in self.lost

    def live_indexes(self, count: int) -> list[int]:
        return [i for i in range(count) if i not in self.lost]

    # ------------------------------------------------------------ rejoin
    async def replace(self, rank: int, start_timeout_s: float, admit_timeout_s: float) -> dict:
        """Start a new engine for lost DP ``rank`` and admit it into the group.

        Raises ValueError (rank not lost, a replacement under way, the group not
        serving) or RuntimeError / TimeoutError (the engine did not start within
        ``start_timeout_s`` or was not admitted within ``admit_timeout_s``; the
        group goes on without it).
        """
        if rank not in self.lost:
            raise ValueError(f"DP rank {rank} is not lost (lost: {sorted(self.lost)})")
        if self._replacing is not None:
            raise ValueError(f"a replacement of DP rank {self._replacing} is under way")
        if self.group_view is not None and not self.group_view().serving:
            raise ValueError(f"the group is {self.group_view().state.value}: replace a rank "
                             "once it serves again")
        llm = self.llm
        client = llm.engine_core
        self.bind_client(client)
        self._replacing = rank
        started = time.time()
        self.events.append({"t": started, "event": "replacement_started", "rank": rank})
        engine: _Replacement | None = None
        try:
            engine = await self._start_engine(client, rank, start_timeout_s)
            await client._call_utility_async("elastic_ft_prepare_join",
                                             engine=client.core_engines[rank])
            loaded = time.time()
            self.events.append({"t": loaded, "event": "replacement_loaded", "rank": rank,
                                "pid": engine.pid, "node": engine.node})
            members = await self._admit(client, rank, admit_timeout_s)
            self.replacements[rank] = engine
        except BaseException as err:
            self.events.append({"t": time.time(), "event": "replacement_failed", "rank": rank,
                                "error": f"{type(err).__name__}: {err}"[:300]})
            if engine is not None:
                engine.stop()  # never leave a half-joined engine behind
            raise
        finally:
            self._replacing = None
        admitted = time.time()
        self.events.append({"t": admitted, "event": "replacement_admitted", "rank": rank,
                            "members": members})
        logger.warning("front end: DP rank %d replaced (pid %d on %s): started in %.1fs, "
                       "admitted in %.2fs; members %s", rank, engine.pid, engine.node,
                       loaded - started, admitted - loaded, members)
        return {"rank": rank, "pid": engine.pid, "node": engine.node, "members": members,
                "start_s": round(loaded - started, 3), "admit_s": round(admitted - loaded, 3)}

    async def _start_engine(self, client, rank: int, timeout_s: float) -> _Replacement:
        """Start rank ``rank``'s replacement engine on the node that lost it: here, if this
        API server started that rank, else through that node's agent (``node_agent.py``)."""
        from vllm.v1.executor import Executor

        from vllm_elastic_ft.vllm import node_agent
        from vllm_elastic_ft.vllm.replacement import engine_addresses, launch_engine
        from vllm_elastic_ft.watchdog.attribution import this_host

        llm = self.llm
        if rank in node_agent.local_ranks(llm.vllm_config.parallel_config):
            process = await asyncio.wait_for(asyncio.to_thread(
                launch_engine, client, llm.vllm_config, Executor.get_class(llm.vllm_config),
                llm.log_stats, rank), timeout_s)
            # vLLM's engine manager stops the replacement with the other engines
            # when the server shuts down (its finalizer holds this same list).
            manager = client.resources.engine_manager
            if manager is not None and isinstance(getattr(manager, "processes", None), list):
                manager.processes.append(process)
            return _Replacement(process.pid, this_host(), process=process)
        import zmq

        from vllm_elastic_ft.comm.store import connect_store
        from vllm_elastic_ft.vllm.watchdog_store import store_address
        from vllm_elastic_ft.vllm.worker_watchdog import GROUP_NAME

        # As for a local one: the new engine connects with the lost one's routing id.
        client.input_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        store = connect_store(store_address())
        answer = await asyncio.to_thread(node_agent.start_remote, store, GROUP_NAME, rank,
                                         engine_addresses(client), timeout_s)
        pid = int(answer["pid"])
        return _Replacement(pid, answer["node"],
                            stop=lambda: node_agent.withdraw(store, GROUP_NAME, rank, pid))

    async def _admit(self, client, rank: int, timeout_s: float) -> list[int]:
        identity = client.core_engines[rank]
        ticket = f"{rank}-{uuid.uuid4().hex[:8]}"
        # Another fault while the replacement was loading: admit it once the group
        # has rebuilt around that one, never into a rebuild.
        if not await self._until_serving(0, timeout_s):
            raise TimeoutError("the group did not serve again; the replacement was not admitted")
        epoch, members = None, []
        self.admitting = True
        try:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
            engines = [client.core_engines[i] for i in self.live_indexes(len(client.core_engines))]
            results = await asyncio.wait_for(asyncio.gather(*[
                client._call_utility_async("elastic_ft_admit", rank, ticket, client.current_wave,
                                           engine=engine) for engine in engines + [identity]]),
                timeout_s)
            epoch, members = results[-1]
            if rank in members:
                with self._lock:
                    self.lost.discard(rank)
                client.engine_inflight[identity] = 0
        finally:
            try:
                await self.llm.resume_generation()
                if epoch is not None:
                    # Keep new requests flowing until the front end's view has caught up
                    # with the admission epoch (its store follower polls).
                    await self._until_serving(epoch, 3.0)
            finally:
                self.admitting = False
        if rank not in members:
            raise RuntimeError(f"DP rank {rank} was not admitted (members {members})")
        return members

    async def _until_serving(self, epoch: int, timeout_s: float) -> bool:
        """Wait until the front end sees the group serving at ``epoch`` or later (True), or
        ``timeout_s`` passes (False). Without a view of the group, True at once."""
        deadline = time.monotonic() + timeout_s
        while self.group_view is not None:
            view = self.group_view()
            if view.epoch >= epoch and view.serving:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # --------------------------------------------------------- re-submission
    async def _move_requests(self, rank: int) -> None:
        client = self.client
        identity = client.core_engines[rank]
        if client.core_engine == identity:
            live = self.live_indexes(len(client.core_engines))
            if live:
                client.core_engine = client.core_engines[live[0]]
        stranded = [rid for rid, engine in list(client.reqs_in_flight.items())
                    if engine == identity]
        for rid in stranded:
            client.reqs_in_flight.pop(rid, None)
            client.engine_inflight[identity] -= 1
        moved = failed = ended = 0
        for rid in stranded:
            if self.llm is not None and rid not in self.llm.output_processor.request_states:
                # Finished or aborted at the front end already (the engine's "finished"
                # can trail its last output): nobody waits for it, running it again
                # would only load a live engine.
                self.finished([rid])
                continue
            request = self.requests.get(rid)
            continuation = self._continuation(rid, request) if request is not None else None
            if continuation is None:
                if request is not None:  # its budget is spent: the client has every token
                    self._end(rid, "length")
                    ended += 1
                else:  # nothing kept to continue it from
                    logger.error("front end: request %s was stranded on DP rank %d and "
                                 "cannot be re-submitted (not kept); ended with an error",
                                 rid, rank)
                    self._end(rid, "error")
                    failed += 1
                continue
            self.moved.add(rid)
            try:
                await client.add_request_async(continuation)
                moved += 1
            except Exception:
                logger.exception("front end: could not re-submit request %s; ended with a "
                                 "retryable error", rid)
                # First the client (at once), then the routing the failed call left.
                self._end(rid, "error")
                failed += 1
                await self._unroute(client, rid)
        self.resubmitted += moved
        self.failed_resubmissions += failed
        self.ended_at_budget += ended
        self.events.append({"t": time.time(), "event": "requests_resubmitted", "rank": rank,
                            "count": moved, "stranded": len(stranded), "failed": failed,
                            "ended_at_budget": ended})
        logger.warning("front end: re-submitted %d of %d request(s) stranded on DP rank %d "
                       "(%d failed, %d had their whole budget)", moved, len(stranded), rank,
                       failed, ended)

    def _end(self, rid: str, reason: str) -> None:
        """Finish stranded request ``rid`` at its client now, as its engine would have.

        ``reason`` is ``"length"`` (its budget is spent) or ``"error"`` (vLLM's
        retryable request-level error, ``FinishReason.ERROR``: the OpenAI server
        raises ``GenerationError`` for it, a 500 response or an error event that
        ends the stream, and vLLM cleans the request up as for any finished one).
        It goes through the output processor's ``process_outputs``, the path of
        every engine output: stats, n > 1 fan-in and the client's queue included.
        """
        from vllm.v1.engine import EngineCoreOutput, FinishReason

        self.finished([rid])
        processor = self.llm.output_processor if self.llm is not None else None
        state = processor.request_states.get(rid) if processor is not None else None
        if state is None:
            return  # nothing waits for it
        if state.detokenizer is None or state.streaming_input:
            # A pooling request (a token-less output cannot finish it) or a streaming-input
            # session (a finish only ends its current chunk): AsyncLLM's encode()/generate()
            # end and abort a request whose queue holds an exception (EngineGenerateError).
            from vllm.exceptions import RetryableRequestError

            if state.queue is not None:
                state.queue.put(RetryableRequestError(
                    f"request {rid} was on a data-parallel engine that was lost"))
            return
        processor.process_outputs([EngineCoreOutput(
            request_id=rid, new_token_ids=[],
            finish_reason=FinishReason.LENGTH if reason == "length" else FinishReason.ERROR)])

    @staticmethod
    async def _unroute(client, rid: str) -> None:
        """Undo what a failed ``add_request_async`` may have left: the request routed to a
        live engine (so that the balancer's counts stay exact), aborted there if it got it."""
        engine = client.reqs_in_flight.get(rid)
        if engine is None:
            return
        try:
            await client.abort_requests_async([rid])
        except Exception as err:  # the engine may never have had it
            logger.debug("front end: abort of request %s after its failed re-submission: %s",
                         rid, err)
        if client.reqs_in_flight.pop(rid, None) is not None:
            client.engine_inflight[engine] -= 1

    def _continuation(self, rid: str, request):
        """``request`` continued after the tokens its client already has, or None if done."""
        import msgspec

        state = self.llm.output_processor.request_states.get(rid) if self.llm else None
        generated: list[int] = []
        if state is not None and state.detokenizer is not None:
            generated = list(state.detokenizer.output_token_ids)
        params = request.sampling_params
        if params is None:  # pooling: nothing generated, run it again
            return msgspec.structs.replace(request)
        budget = remaining_budget(params.max_tokens, params.min_tokens, len(generated))
        if budget is None:
            return None
        params = params.clone()
        params.max_tokens, params.min_tokens = budget
        params.prompt_logprobs = None
        return msgspec.structs.replace(
            request, prompt_token_ids=list(request.prompt_token_ids or []) + generated,
            sampling_params=params, data_parallel_rank=None)

    # ------------------------------------------------------------- outputs
    def remember(self, request) -> None:
        # Only the client's original request: a continuation is always rebuilt from it
        # (prompt + every token generated so far), however often the request moves.
        self.requests.setdefault(request.request_id, request)

    def finished(self, request_ids) -> None:
        for rid in request_ids:
            self.requests.pop(rid, None)
            self.moved.discard(rid)

    def drop_late_outputs(self, outputs) -> None:
        """Outputs a lost engine still sent for requests that now run elsewhere."""
        if outputs.engine_index not in self.lost or not self.moved:
            return
        if outputs.outputs:
            outputs.outputs = [o for o in outputs.outputs if o.request_id not in self.moved]
        if outputs.finished_requests:
            outputs.finished_requests = {r for r in outputs.finished_requests
                                         if r not in self.moved} or None

    def status(self) -> dict:
        return {"lost_ranks": sorted(self.lost), "requests_resubmitted": self.resubmitted,
                "requests_failed": self.failed_resubmissions,
                "requests_ended_at_budget": self.ended_at_budget,
                "replaced_ranks": sorted(self.replacements),
                "events": self.events[-20:]}


_recovery: FrontEndRecovery | None = None


def install(min_live_ranks: int = 1) -> FrontEndRecovery:
    """Switch in-engine recovery on in this API server (the endpoint plugin does, once it
    knows the config); until then every patch on the front end behaves as stock vLLM."""
    global _recovery
    if _recovery is None:
        _recovery = FrontEndRecovery(min_live_ranks)
    return _recovery


def frontend_recovery() -> FrontEndRecovery | None:
    return _recovery
