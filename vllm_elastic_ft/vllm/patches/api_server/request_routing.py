"""Route requests around lost DP engines and keep what a re-submission needs.

Targets vLLM 0.32.0's ``DPLBAsyncMPClient`` (the API server's DP load
balancer) and ``AsyncMPClient``. All three patches do nothing until in-engine
recovery is installed in the API server (``frontend_recovery.install``):

* ``get_core_engine_for_request``: keep the request (vLLM's front end does not
  keep the full ``EngineCoreRequest``) and, if the balancer picked a lost
  engine, move the request to the live engine with the fewest of this client's
  requests in flight;
* ``process_engine_outputs``: forget finished requests; drop what a lost engine
  still sends for requests that were moved elsewhere;
* ``call_utility_all_async``: ask live engines only (a lost engine never answers,
  and vLLM would wait for it forever).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from vllm_elastic_ft.vllm.frontend_recovery import frontend_recovery
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch

_CLIENT = "vllm.v1.engine.core_client"

ROUTE = PatchSpec(
    target=f"{_CLIENT}:DPLBAsyncMPClient.get_core_engine_for_request",
    why="The DP balancer keeps routing to an engine that is gone (its load counts freeze).",
    how="Remember the request; if a lost engine was chosen, undo that and pick the live "
    "engine with the fewest in-flight requests.",
    upstream="vllm-project/vllm#39863",
    remove_when="vLLM's DP balancer knows about lost engines.",
    params=("self", "request"),
    vllm_versions=CHECKED_WITH_0_33,
)

OUTPUTS = PatchSpec(
    target=f"{_CLIENT}:DPLBAsyncMPClient.process_engine_outputs",
    why="A lost engine's late outputs would duplicate tokens of requests moved elsewhere.",
    how="Drop them; forget finished requests; then the stock bookkeeping.",
    upstream="vllm-project/vllm#39863",
    remove_when="vLLM re-submits requests of a lost DP engine itself.",
    params=("self", "outputs"),
    vllm_versions=CHECKED_WITH_0_33,
)

UTILITY_ALL = PatchSpec(
    target=f"{_CLIENT}:AsyncMPClient.call_utility_all_async",
    why="A utility call to every engine waits forever for an engine that is gone.",
    how="Call the live engines only.",
    upstream="vllm-project/vllm#39863",
    remove_when="vLLM tolerates the loss of one DP engine.",
    params=("self", "method"),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (ROUTE, OUTPUTS, UTILITY_ALL)


def _make_route(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_core_engine_for_request(self, request):
        recovery = frontend_recovery()
        if recovery is None:
            return original(self, request)
        recovery.bind_client(self)
        recovery.remember(request)
        chosen = original(self, request)
        index = self.core_engines.index(chosen)
        live = recovery.live_indexes(len(self.core_engines))
        if not recovery.is_lost(index) or not live:
            return chosen
        self.engine_inflight[chosen] -= 1
        better = self.core_engines[min(live, key=lambda i: self.engine_inflight[self.core_engines[i]])]
        self.reqs_in_flight[request.request_id] = better
        self.engine_inflight[better] += 1
        return better

    return get_core_engine_for_request


def _make_outputs(original: Callable[..., Any]) -> Callable[..., Any]:
    async def process_engine_outputs(self, outputs):
        recovery = frontend_recovery()
        if recovery is not None:
            recovery.drop_late_outputs(outputs)
            if outputs.finished_requests:
                recovery.finished(outputs.finished_requests)
        return await original(self, outputs)

    return process_engine_outputs


def _make_utility_all(original: Callable[..., Any]) -> Callable[..., Any]:
    async def call_utility_all_async(self, method: str, *args):
        recovery = frontend_recovery()
        if recovery is None or not recovery.lost:
            return await original(self, method, *args)
        live = recovery.live_indexes(len(self.core_engines))
        return await asyncio.gather(*[
            self._call_utility_async(method, *args, engine=self.core_engines[i]) for i in live])

    return call_utility_all_async


def apply() -> None:
    apply_patch(ROUTE, _make_route)
    apply_patch(OUTPUTS, _make_outputs, kind="staticmethod")
    apply_patch(UTILITY_ALL, _make_utility_all)
