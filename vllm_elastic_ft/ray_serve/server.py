"""ElasticDPServer: Ray Serve LLM's ``DPServer`` with the plugin's view of its gang.

One replica is one DP rank of a gang (Ray Serve LLM runs vLLM in external-LB
DP mode: one engine core per replica, the gang's ranks form one DP/EP group).
The subclass (targets ray 2.60 ``DPServer``):

* gives the gang one watchdog store: rank 0 hosts it and publishes its address
  in Ray's internal KV under the gang id; the other ranks read it before their
  engine starts (engines and workers inherit it, as under ``vllm serve``);
* follows the gang's group state from that store (the same follower as the API
  server's ``/elastic_ft/status``);
* **health**: ``check_health`` stays green while the gang heals in place (FENCED,
  REBUILDING within ``rebuild_budget_s``; a rebuilt, READY gang can serve and is
  judged as HEALTHY, so an idle gang that healed is never restarted) and on a
  replica whose rank the gang left behind; it raises once the gang is FAILED (or over budget), so Ray
  Serve's gang restart (``RESTART_GANG``) happens only then; with
  ``in_engine_rebuild: false`` it raises as soon as the gang is fenced;
* **traffic**: ``record_routing_stats`` says ``serving: False`` while the gang is
  not serving or this rank is lost; :mod:`.router` routes around such replicas;
  a request that fails here because this rank was lost is finished on a serving
  replica through the deployment's handle — sent again whole if nothing reached
  the client, continued after the tokens the client has if it was streaming
  (``continuation.py``) — so the client sees no error.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put
from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.store import without_secret
from vllm_elastic_ft.config import CONFIG_KEY, ElasticFTConfig
from vllm_elastic_ft.group.state_machine import GroupState
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.ray_serve.continuation import StreamContinuation

logger = get_logger(__name__)

#: States in which a gang heals itself: Ray must not restart it while its budget lasts.
#: READY is not one of them: a rebuilt gang can serve (its new communicator's rendezvous
#: took every member), whether or not traffic arrived since, so it is judged as HEALTHY
#: and never ages into a restart.
HEALING = (GroupState.SUSPECT, GroupState.FENCED, GroupState.REBUILDING)
STORE_KEY_PREFIX = "vllm_elastic_ft/store/"


def _store_key(gang_id: str) -> bytes:
    return (STORE_KEY_PREFIX + gang_id).encode()


async def _gang_store_address(gang_id: str, rank: int, timeout_s: float = 120.0) -> str:
    """Rank 0 hosts the gang's store; every rank returns its address."""
    from vllm_elastic_ft.vllm import watchdog_store

    if rank == 0:
        host = os.environ.get(watchdog_store.STORE_HOST_ENV) or _node_ip()
        os.environ[watchdog_store.STORE_HOST_ENV] = host
        address = watchdog_store.host_store(ElasticFTConfig())
        _internal_kv_put(_store_key(gang_id), address.encode(), overwrite=True)
        return address
    deadline = time.monotonic() + timeout_s
    while (raw := _internal_kv_get(_store_key(gang_id))) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gang {gang_id}: rank 0 never published its watchdog store")
        await asyncio.sleep(0.2)
    return raw.decode()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


class ElasticDPServer(DPServer):
    async def __init__(self, llm_config, *, engine_cls=None, model_downloader=None):
        ctx = serve.get_replica_context()
        gang = ctx.gang_context
        if gang is None:
            raise RuntimeError("ElasticDPServer needs gang scheduling (data_parallel_size > 1)")
        self._ft_rank, self._ft_gang, self._ft_world = gang.rank, gang.gang_id, gang.world_size
        self._ft_deployment = (ctx.deployment, ctx.app_name)
        additional = dict(llm_config.engine_kwargs.get("additional_config") or {})
        self._ft_config = ElasticFTConfig.from_additional_config(additional)
        address = await _gang_store_address(self._ft_gang, self._ft_rank)
        from vllm_elastic_ft.vllm import watchdog_store

        os.environ[watchdog_store.STORE_ENV] = address  # inherited by the engine processes
        logger.info("gang %s rank %d/%d: watchdog store %s", self._ft_gang, self._ft_rank,
                    self._ft_world, without_secret(address))
        await super().__init__(llm_config, engine_cls=engine_cls,
                               model_downloader=model_downloader)
        from vllm_elastic_ft.comm.store import connect_store
        from vllm_elastic_ft.vllm.endpoints import FrontEndGroup

        self._ft_group = FrontEndGroup(connect_store(address), self._ft_world, None,
                                       self._ft_config)
        self._ft_group.store_address = address
        self._ft_group.follower.start()
        # Completed-request counts go to the store from one thread of their own.
        self._ft_counter = (connect_store(address), ThreadPoolExecutor(1, "elastic-ft-count"))
        self._ft_store = connect_store(address)
        self._ft_rejoins: list[dict] = []
        self._ft_replacement = None
        self._ft_coordinator = None
        self._ft_forwarding = 0  # requests streaming through this replica to another one
        self._ft_drain_started: float | None = None
        if self._ft_config.in_engine_rebuild:
            self._ft_start_rejoin()

    # ----------------------------------------------------------- rejoin
    def _ft_start_rejoin(self) -> None:
        """Rejoin in place (``rejoin.py``): rank 0 keeps the gang's DP coordinator alive
        past its engine, every replica takes part in admissions, and a lost one brings its
        rank back (``rejoin``, up to ``rejoin_attempts``)."""
        from vllm_elastic_ft.comm.store import connect_store
        from vllm_elastic_ft.ray_serve.rejoin import AdmissionWatcher, publish_coordinator

        llm = self._ft_llm()
        if self._ft_rank == 0 and llm is not None:
            self._ft_coordinator = publish_coordinator(self._ft_store, llm)
        self._ft_watcher = AdmissionWatcher(
            connect_store(self._ft_group.store_address), self._ft_rank,
            lambda: None if self._ft_lost_here() else self._ft_llm(),
            lambda: self._ft_rank in self._ft_view().live_ranks,
            self._ft_config.rebuild_budget_s)
        self._ft_watcher.start()
        if self._ft_config.rejoin and self._ft_config.rejoin_attempts > 0:
            self._ft_rejoin_task = asyncio.get_running_loop().create_task(self._ft_rejoin_loop())

    async def __del__(self) -> None:
        await super().__del__()
        if (replacement := getattr(self, "_ft_replacement", None)) is not None:
            replacement.kill()  # the replacement engine and its client
        if (coordinator := getattr(self, "_ft_coordinator", None)) is not None:
            coordinator.shutdown()  # rank 0's DP coordinator (taken out of vLLM's client)

    def _ft_llm(self):
        """This replica's vLLM ``AsyncLLM`` (Ray's VLLMEngine keeps it privately)."""
        return getattr(self.engine, "_engine_client", None) if self.engine else None

    async def _ft_rejoin_loop(self) -> None:
        attempts = 0
        while attempts < self._ft_config.rejoin_attempts:
            await asyncio.sleep(0.5)
            view = self._ft_view()
            # Lost, and the gang serves without this rank: bring it back.
            if not (self._ft_excluded() and view.serving):
                continue
            attempts += 1
            started = time.time()
            try:
                members = await asyncio.wait_for(self._ft_rejoin(),
                                                 self._ft_config.rejoin_timeout_s)
            except Exception as err:  # noqa: BLE001 - recorded; the gang serves without us
                logger.exception("gang %s rank %d: rejoin attempt %d of %d failed", self._ft_gang,
                                 self._ft_rank, attempts, self._ft_config.rejoin_attempts)
                self._ft_rejoins.append({"t": started, "ok": False, "attempt": attempts,
                                         "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            took = time.time() - started
            self._ft_rejoins.append({"t": started, "ok": True, "attempt": attempts,
                                     "members": members, "rejoin_s": round(took, 3)})
            logger.warning("gang %s rank %d: rejoined in place in %.1fs (members %s)",
                           self._ft_gang, self._ft_rank, took, members)
            attempts = 0  # a later loss of this rank gets its own attempts

    async def _ft_rejoin(self) -> list[int]:
        from vllm_elastic_ft.ray_serve.rejoin import admit_replacement, start_replacement

        old_llm = self._ft_llm()
        coordinator = json.loads(await asyncio.to_thread(self._ft_store.get,
                                                         keys.serve_coordinator()))
        logger.warning("gang %s rank %d: lost; starting a new engine to rejoin in place",
                       self._ft_gang, self._ft_rank)
        replacement = await asyncio.to_thread(start_replacement, old_llm, self._ft_rank,
                                              coordinator)
        try:
            members = await admit_replacement(self._ft_store, replacement, self._ft_rank,
                                              self._ft_config.rebuild_budget_s)
            engine = self._engine_cls(self._llm_config)
            # Ray's own start-up of the OpenAI serving objects, on the engine client we
            # built (VLLMEngine.start would otherwise launch an engine of its own).
            engine._start_async_llm_engine = lambda *args, **kwargs: replacement.llm
            await engine.start()
        except BaseException:
            await asyncio.to_thread(replacement.kill)
            raise
        self.engine, self._ft_replacement = engine, replacement
        asyncio.get_running_loop().create_task(_retire(old_llm))
        return members

    # ------------------------------------------------------------ state
    def _ft_view(self):
        return self._ft_group.controller.view

    def _ft_excluded(self) -> bool:
        """The gang agreed on members without this replica's rank (it goes on without it)."""
        return self._ft_rank not in self._ft_view().live_ranks

    def _ft_engine_dead(self) -> bool:
        client = self._ft_llm()
        return bool(client is not None and getattr(client, "errored", False))

    def _ft_tokenizer(self):
        """vLLM's tokenizer of this replica's engine (a continuation's text is re-detokenized
        with it), or None."""
        return getattr(self._ft_llm(), "tokenizer", None)

    def _ft_lost_here(self) -> bool:
        """This replica cannot run requests: its rank was left out, or its engine died."""
        return self._ft_excluded() or self._ft_engine_dead()

    def _ft_serving(self) -> bool:
        return self._ft_view().serving and not self._ft_lost_here()

    def elastic_ft_status(self) -> dict[str, Any]:
        """The gang as this replica sees it (``/elastic_ft/status`` of a vLLM server)."""
        status = self._ft_group.status()
        status.update(gang_id=self._ft_gang, rank=self._ft_rank, serving_here=self._ft_serving(),
                      rejoins=self._ft_rejoins[-10:],
                      admissions=getattr(getattr(self, "_ft_watcher", None), "admitted", [])[-10:])
        return status

    # ----------------------------------------------------------- health
    async def check_health(self) -> None:
        view = self._ft_view()
        if view.state is GroupState.FAILED:
            raise RuntimeError(f"gang {self._ft_gang}: DP group FAILED ({view.reason}); "
                               "a gang restart is needed")
        if not self._ft_config.in_engine_rebuild:
            # Nothing will heal the gang in place: every replica asks for the
            # gang restart at once, instead of waiting for its engines to die.
            if view.state in (GroupState.FENCED, GroupState.REBUILDING, GroupState.READY):
                raise RuntimeError(f"gang {self._ft_gang}: DP group {view.state.value} "
                                   f"({view.reason}) and in_engine_rebuild is off; "
                                   "a gang restart is needed")
            return await super().check_health()
        if view.state in HEALING:
            if time.time() - view.since > self._ft_config.rebuild_budget_s:
                raise RuntimeError(f"gang {self._ft_gang}: {view.state.value} for longer than "
                                   f"rebuild_budget_s={self._ft_config.rebuild_budget_s}")
            return None  # healing in place: no restart
        if self._ft_excluded():
            # The gang goes on without this rank; this replica only forwards.
            return None
        # A dead engine the gang has not healed around (e.g. its last rank): raise, so
        # Ray restarts the gang (the fallback) — once the requests this replica forwards
        # to other gangs have finished (they stream through it: a restart now would cut
        # them), for at most rebuild_budget_s.
        try:
            await super().check_health()
        except Exception:
            if self._ft_forwarding and self._ft_draining_since(time.monotonic()):
                logger.warning("gang %s rank %d: engine dead; %d forwarded request(s) still "
                               "streaming, the gang restart waits for them", self._ft_gang,
                               self._ft_rank, self._ft_forwarding)
                return None
            raise
        self._ft_drain_started = None
        return None

    def _ft_draining_since(self, now: float) -> bool:
        """Whether the restart may still wait for forwarded requests (within the budget)."""
        if self._ft_drain_started is None:
            self._ft_drain_started = now
        return now - self._ft_drain_started < self._ft_config.rebuild_budget_s

    # ---------------------------------------------------------- traffic
    async def record_routing_stats(self) -> dict[str, Any]:
        stats = {} if self._ft_lost_here() else dict(await super().record_routing_stats())
        view = self._ft_view()
        stats["elastic_ft"] = {"gang": self._ft_gang, "rank": self._ft_rank,
                               "state": view.state.value, "epoch": view.epoch,
                               "serving": self._ft_serving()}
        return stats

    async def chat(self, request, raw_request_info=None):
        return await self._ft_run("chat", request, raw_request_info)

    async def completions(self, request, raw_request_info=None):
        return await self._ft_run("completions", request, raw_request_info)

    async def _ft_run(self, method: str, request, raw_request_info):
        if self._ft_lost_here():
            return self._ft_elsewhere(method, request, raw_request_info)
        tracker = StreamContinuation.start(request, method, self._ft_tokenizer())
        stream = await getattr(super(), method)(request, raw_request_info)
        return self._ft_or_elsewhere(stream, method, request, raw_request_info, tracker)

    async def _ft_or_elsewhere(self, stream, method: str, request, raw_request_info,
                               tracker: StreamContinuation | None = None):
        """Yield ``stream``; if it fails because this rank was lost, finish the request on a
        serving replica: all of it when nothing reached the client yet, else (a stream)
        as a continuation after the tokens the client already has."""
        yielded = False
        try:
            async for item in stream:
                shown, errored = (item, _is_error(item)) if tracker is None \
                    else tracker.observe(item)
                if errored and (tracker is not None or not yielded) \
                        and await self._ft_wait_lost():
                    if tracker is not None and (part := _without_done(shown)):
                        yield part
                        yielded = True
                    break
                yield item if errored else shown  # not a lost rank: the engine's own error
                yielded = True
            else:
                self._ft_count_completed()
                return
        except Exception:
            # Sent again whole only if the client has nothing yet (else it would see its
            # first tokens twice); continued only where the stream can be.
            continuable = tracker is not None and tracker.prompt_ids is not None
            if (yielded and not continuable) or not await self._ft_wait_lost():
                raise
        async for item in self._ft_resume(method, request, raw_request_info, tracker, yielded):
            yield item

    async def _ft_resume(self, method: str, request, raw_request_info,
                         tracker: StreamContinuation | None, yielded: bool):
        if tracker is not None and tracker.finished:
            yield ["data: [DONE]\n\n"]  # the client has every token already
            return
        if tracker is None or not yielded or tracker.prompt_ids is None:
            if tracker is not None:
                request.return_token_ids = tracker.client_wants_ids
            logger.warning("gang %s rank %d lost: re-sending a %s request to a serving "
                           "replica", self._ft_gang, self._ft_rank, method)
            self._ft_count(keys.serve_resent(self._ft_rank))
            async for item in self._ft_elsewhere(method, request, raw_request_info):
                yield item
            return
        continuation = tracker.request()
        if continuation is None:  # its budget is spent: nothing left to generate
            yield ["data: [DONE]\n\n"]
            return
        logger.warning("gang %s rank %d lost: continuing a %s stream on a serving replica "
                       "after %d token(s)", self._ft_gang, self._ft_rank, method,
                       len(tracker.generated))
        self._ft_count(keys.serve_continued(self._ft_rank))
        async for item in self._ft_elsewhere("completions", continuation, raw_request_info):
            yield tracker.adapt(item)

    def _ft_count_completed(self) -> None:
        """Requests this rank completed (``keys.serve_completed``): per-gang throughput for
        operators and benchmarks."""
        self._ft_count(keys.serve_completed(self._ft_rank))

    def _ft_count(self, key: str) -> None:
        """Add one to a counter in the gang's store, off the event loop (fire and forget)."""
        store, thread = self._ft_counter
        thread.submit(store.add, key, 1)

    async def _ft_wait_lost(self, settle_s: float = 2.0) -> bool:
        """Whether this rank was lost (the gang's agreement may lag the error briefly)."""
        deadline = time.monotonic() + settle_s
        while not self._ft_lost_here():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _ft_elsewhere(self, method: str, request, raw_request_info):
        deployment, app = self._ft_deployment
        handle = serve.get_deployment_handle(deployment, app).options(stream=True)
        self._ft_forwarding += 1
        try:
            async for item in getattr(handle, method).remote(request, raw_request_info):
                yield item
        finally:
            self._ft_forwarding -= 1


async def _retire(llm, drain_s: float = 60.0) -> None:
    """Shut the lost engine's client down once its requests have ended. Not before: they
    end when its output handler hands them the engine's death (``EngineDeadError``, which
    sends them elsewhere); shutting the client down first cancels that handler, and they
    would wait forever."""
    if llm is None:
        return
    deadline = time.monotonic() + drain_s
    while llm.output_processor.request_states and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    if llm.output_processor.request_states:
        logger.warning("the lost engine's client still holds %d request(s) after %.0fs: left "
                       "open", len(llm.output_processor.request_states), drain_s)
        return
    try:
        llm.shutdown()  # on the event loop: it cancels the client's tasks
    except Exception as err:  # noqa: BLE001 - it was replaced; nothing depends on it
        logger.warning("shutting down the lost engine's client: %s", err)


def _without_done(items: Any) -> Any:
    """What of a streamed item may still reach the client when the stream continues
    elsewhere: not its ``[DONE]`` (the continuation sends its own)."""
    if isinstance(items, list):
        return [i for i in items if not (isinstance(i, str) and "[DONE]" in i)]
    return None if items is None or (isinstance(items, str) and "[DONE]" in items) else items


def _is_error(item: Any) -> bool:
    return type(item).__name__ == "ErrorResponse" or (
        isinstance(item, list) and any(type(i).__name__ == "ErrorResponse" for i in item))


def config_json(config: ElasticFTConfig) -> str:
    return json.dumps({CONFIG_KEY: config.to_dict()})
