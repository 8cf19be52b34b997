"""Ray Serve LLM's OpenAI ingress, with requests that outlive the replica process they ran on.

A replica whose rank is lost while its process lives finishes its own requests
elsewhere (``server.ElasticDPServer._ft_or_elsewhere``). When the replica
*process* dies (a crash, an OOM kill, a node going away), nothing is left in it to
do that: Ray Serve's handle raises ``ActorDiedError`` into the ingress, which turns
it into an HTTP 500 or a broken stream, and Ray restarts the gang (rank 0's process
also hosts the gang's store and vLLM's DP coordinator, so the gang cannot heal).

:class:`ElasticOpenAiIngress` is Ray's ``OpenAiIngress`` with one method
overridden, ``_get_response`` (the call of the model deployment's handle; targets
ray 2.60). When that call fails because the replica died, the request is finished
on another replica through the same handle, with the same bookkeeping as the
replica's own (``continuation.StreamContinuation``, one implementation):

* nothing reached the client yet (a plain request, or a stream before its first
  chunk): sent again whole;
* a stream under way: continued as prompt + the tokens already streamed, the
  remaining budget, the same sampling, its chunks in the original stream's shape
  and its text re-detokenized as the lost engine's front end would have written it.

At most ``attempts`` replica deaths per request (a continuation can be routed to a
gang that is about to be restarted too); past that the error reaches the client.
Ray's router only picks live replicas, so a retry goes to another gang, or waits
for one.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, AsyncGenerator, Optional

from ray.exceptions import RayActorError
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.serve.exceptions import ReplicaUnavailableError
from vllm.logger import init_logger

from vllm_elastic_ft.ray_serve.continuation import StreamContinuation

logger = init_logger(__name__)

#: What the deployment handle raises when the replica process serving a call is gone.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
#: Replica deaths one request survives before its client sees the error.
DEFAULT_ATTEMPTS = 3


class ElasticOpenAiIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, tokenizer_sources=None,
                 attempts: int = DEFAULT_ATTEMPTS, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        #: model id -> where its tokenizer is (loaded on a request's first continuation).
        self._ft_tokenizer_sources: dict[str, str] = dict(tokenizer_sources or {})
        self._ft_tokenizers: dict[str, Any] = {}
        self._ft_attempts = attempts
        self._ft_counts: Counter = Counter()

    async def elastic_ft_counts(self) -> dict[str, int]:
        """Requests this ingress finished elsewhere after their replica died: ``resent``
        (whole), ``continued`` (streams), ``gave_up`` (the client got the error)."""
        return dict(self._ft_counts)

    async def _get_response(self, *, body, call_method: str,
                            raw_request=None) -> AsyncGenerator[Any, None]:
        if call_method not in ("chat", "completions"):
            async for item in super()._get_response(body=body, call_method=call_method,
                                                    raw_request=raw_request):
                yield item
            return
        tracker = StreamContinuation.start(body, call_method)
        request, method, yielded = body, call_method, False
        for attempt in range(1, self._ft_attempts + 1):
            try:
                async for item in super()._get_response(body=request, call_method=method,
                                                        raw_request=raw_request):
                    if tracker is None:
                        pass  # a plain request: its one response, or an error
                    elif request is body:
                        shown, errored = tracker.observe(item)
                        if errored:  # the replica's own error: the client gets it as it is
                            shown = item
                        if shown is None:
                            continue
                        item = shown
                    else:
                        item = tracker.adapt(item)
                    yield item
                    yielded = True
                return
            except REPLICA_GONE as err:
                if (yielded and tracker is None) or attempt == self._ft_attempts:
                    self._ft_counts["gave_up"] += 1
                    raise
                next_request = self._ft_next(body, tracker, yielded)
                if next_request is None:  # every token was streamed already
                    yield ["data: [DONE]\n\n"]
                    return
                if next_request is not body:
                    self._ft_prime(tracker, body)
                request, method = next_request, \
                    (call_method if next_request is body else "completions")
                logger.warning("a %s request's replica died (%s): %s on another replica "
                               "(attempt %d of %d)", call_method, type(err).__name__,
                               "continuing it" if request is not body else "sending it again",
                               attempt + 1, self._ft_attempts)

    def _ft_next(self, body, tracker: Optional[StreamContinuation], yielded: bool):
        """What to send after a replica died: the request itself when its client has nothing
        yet, else its continuation (None: nothing is left to generate)."""
        if not yielded:
            self._ft_counts["resent"] += 1
            if tracker is not None:  # it starts over: forget what the dead replica streamed
                tracker.generated, tracker.prompt_ids, tracker.finished = [], None, False
                tracker.head = {}
            return body
        if tracker.finished:
            return None
        continuation = tracker.request()
        if continuation is None:
            return None
        self._ft_counts["continued"] += 1
        return continuation

    def _ft_prime(self, tracker: StreamContinuation, body) -> None:
        """Give the tracker the model's tokenizer, so the continuation's text is the lost
        engine's (loaded once per model; without one, the serving engine's text passes)."""
        if tracker.tokenizer is not None or tracker._detokenizer is not None:
            return
        model = getattr(body, "model", None) or next(iter(self._ft_tokenizer_sources), None)
        if model not in self._ft_tokenizers:
            source = self._ft_tokenizer_sources.get(model)
            tokenizer = None
            if source is not None:
                try:
                    from vllm.tokenizers import get_tokenizer

                    tokenizer = get_tokenizer(source)
                except Exception as err:  # noqa: BLE001 - the text is then the engine's own
                    logger.warning("no tokenizer for %s at %s (%s): a continued stream's "
                                   "text is the serving engine's", model, source, err)
            self._ft_tokenizers[model] = tokenizer
        tracker.tokenizer = self._ft_tokenizers[model]
