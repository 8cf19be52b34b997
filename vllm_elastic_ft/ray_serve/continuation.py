"""Continue a stream whose rank was lost, on a serving replica, so its client sees no error.

A Ray Serve LLM replica is one DP rank with one engine. When its rank is lost
mid-stream, the tokens its client already has cannot be taken back, and the
request cannot simply be sent again (the client would see them twice). So
the replica (it stays up) continues the request on a serving replica through
the deployment handle, the way the ``vllm serve`` front end continues it on a
live engine: prompt + the tokens already streamed, the remaining budget
(``vllm/continuation.py``, the one rule for both front ends), the same
sampling settings — and keeps streaming to its client.

:class:`StreamContinuation` does the bookkeeping for one streaming request:

* :meth:`start` asks the engine for token ids (``return_token_ids``) so the
  prompt's and the generated tokens are known exactly (re-tokenizing text
  would not give the same ids); they are stripped again from what the client
  gets unless it asked for them itself;
* :meth:`observe` reads every chunk on its way to the client (and says whether
  it is the engine's error, which is held back);
* :meth:`request` builds the continuation, always a token-id *completions*
  request (a chat request's prompt ids already hold its chat template);
* :meth:`adapt` turns the continuation's chunks into the original stream's
  shape: its id, model and creation time, and chat deltas for a chat request;
* the continuation's *text* is not the serving engine's: vLLM's detokenizer
  primes itself with the prompt, and a continuation's prompt ends with the
  tokens already generated — when those end inside a multi-byte character
  (common with a random-weight model, possible with any byte-level BPE), its
  first chunk holds the whole prompt decoded (vLLM 0.32 resets its decode
  stream on an invalid prefix). So the tracker runs vLLM's own incremental
  detokenizer (``IncrementalDetokenizer.from_new_request``) over the original
  prompt and every generated token, exactly as the lost engine's front end
  did, and the client's text is the no-fault text.

Works on the SSE strings Ray Serve LLM streams (``data: {json}``, batched in
lists), for requests with one choice (``n == 1``); others are not continued.
Targets ray 2.60's ``LLMServer`` streaming and vLLM 0.32's OpenAI protocol.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_elastic_ft.vllm.continuation import remaining_budget

#: Sampling settings a continuation keeps (names shared by vLLM's chat and completions).
CARRIED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                  "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty",
                  "skip_special_tokens", "spaces_between_special_tokens",
                  "include_stop_str_in_output", "stream_options", "user", "priority")
_DONE = "[DONE]"

#: Which streams are continued: chat and completions (one choice each).
CONTINUED_KINDS = ("chat", "completions")
_ID_FIELDS = ("token_ids", "prompt_token_ids")


class StreamContinuation:
    """The state of one streaming request that may have to continue elsewhere."""

    def __init__(self, request: Any, kind: str, tokenizer: Any = None):
        self.kind = kind  # "chat" or "completions"
        self.original = request
        #: vLLM's tokenizer of the model (None: texts pass through as the engine wrote them).
        self.tokenizer = tokenizer
        self._detokenizer = None  # built when the continuation starts
        self.client_wants_ids = bool(getattr(request, "return_token_ids", False))
        self.prompt_ids: list[int] | None = None
        self.generated: list[int] = []
        self.finished = False
        self.head: dict[str, Any] = {}  # id, model, created of the client's stream

    @classmethod
    def start(cls, request: Any, kind: str, tokenizer: Any = None) -> StreamContinuation | None:
        """Track ``request`` (and ask its engine for token ids), or None if it cannot be
        continued: not streaming, more than one choice, or a chat stream (see
        ``CONTINUED_KINDS``)."""
        if kind not in CONTINUED_KINDS:
            return None
        if not getattr(request, "stream", False) or (getattr(request, "n", 1) or 1) != 1:
            return None
        if not hasattr(request, "return_token_ids"):
            return None
        tracker = cls(request, kind, tokenizer)
        request.return_token_ids = True
        return tracker

    # --------------------------------------------------------- the stream
    def observe(self, item: Any) -> tuple[Any, bool]:
        """Record one streamed item; returns it as the client gets it (ids stripped unless
        asked for) and whether it carries the engine's error (then it must not reach the
        client: the request continues elsewhere, or the caller yields it after all)."""
        texts = item if isinstance(item, list) else [item]
        out, errored = [], False
        for text in texts:
            payload = _payload(text)
            if payload is None:
                out.append(text)
                continue
            if "error" in payload:
                errored = True
                continue
            if not self.head:
                self.head = {k: payload.get(k) for k in ("id", "model", "created")}
            self._record(payload)
            out.append(self._for_client(payload) if not self.client_wants_ids else text)
        if isinstance(item, list):
            return out, errored
        return (out[0] if out else None), errored

    def _record(self, payload: dict) -> None:
        if self.prompt_ids is None and payload.get("prompt_token_ids") is not None:
            self.prompt_ids = list(payload["prompt_token_ids"])
        for choice in payload.get("choices") or ():
            if choice.get("prompt_token_ids") is not None and self.prompt_ids is None:
                self.prompt_ids = list(choice["prompt_token_ids"])
            self.generated += list(choice.get("token_ids") or ())
            if choice.get("finish_reason") is not None:
                self.finished = True

    @staticmethod
    def _for_client(payload: dict) -> str:
        payload.pop("prompt_token_ids", None)
        for choice in payload.get("choices") or ():
            for key in _ID_FIELDS:
                choice.pop(key, None)
        return f"data: {json.dumps(payload)}\n\n"

    # ---------------------------------------------------- the continuation
    def request(self):
        """The continuation as a vLLM ``CompletionRequest``, or None when there is nothing
        left to generate (or the prompt's ids never arrived: then it cannot be continued)."""
        if self.finished or self.prompt_ids is None:
            return None
        original = self.original
        max_tokens = getattr(original, "max_completion_tokens", None) or original.max_tokens
        budget = remaining_budget(max_tokens, getattr(original, "min_tokens", 0),
                                  len(self.generated))
        if budget is None:
            return None
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        carried = {f: getattr(original, f) for f in CARRIED_FIELDS
                   if f in original.model_fields_set and f in CompletionRequest.model_fields}
        return CompletionRequest(model=original.model, prompt=self.prompt_ids + self.generated,
                                 max_tokens=budget[0], min_tokens=budget[1], stream=True,
                                 return_token_ids=True, **carried)

    def adapt(self, item: Any) -> Any:
        """A chunk of the continuation, in the shape of the client's original stream."""
        if isinstance(item, list):
            return [self.adapt(text) for text in item]
        payload = _payload(item)
        if payload is None or "error" in payload:
            return item
        self._redetokenize(payload)  # before _record: primed with the tokens the client has
        self._record(payload)
        payload.update({k: v for k, v in self.head.items() if v is not None})
        if self.kind == "chat":
            payload = _as_chat_chunk(payload)
        if not self.client_wants_ids:
            return self._for_client(payload)
        return f"data: {json.dumps(payload)}\n\n"


    def _redetokenize(self, payload: dict) -> None:
        """Replace the continuation's text by what the lost engine's front end would have
        streamed for these tokens (see the module docstring)."""
        if self.tokenizer is None:
            return
        if self._detokenizer is None:
            self._detokenizer = self._primed_detokenizer(self.generated)
        for choice in payload.get("choices") or ():
            finished = choice.get("finish_reason") is not None
            # A stop token (not a stop string) ends the request: vLLM leaves its text out.
            stop_token = choice.get("finish_reason") == "stop" and \
                not isinstance(choice.get("stop_reason"), str)
            self._detokenizer.update(list(choice.get("token_ids") or ()),
                                     stop_terminated=stop_token)
            choice["text"] = self._detokenizer.get_next_output_text(finished, delta=True)

    def _primed_detokenizer(self, streamed: list[int]):
        """vLLM's detokenizer for the original request, fed the tokens the client already
        has (their text is the client's; it is read and dropped)."""
        from types import SimpleNamespace

        from vllm.sampling_params import SamplingParams
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        original = self.original
        params = SamplingParams(
            skip_special_tokens=getattr(original, "skip_special_tokens", True),
            spaces_between_special_tokens=getattr(original, "spaces_between_special_tokens",
                                                  True),
            stop=getattr(original, "stop", None) or None,
            include_stop_str_in_output=getattr(original, "include_stop_str_in_output", False),
            min_tokens=getattr(original, "min_tokens", 0) or 0)
        request = SimpleNamespace(request_id="continuation", prompt_token_ids=self.prompt_ids,
                                  sampling_params=params)
        detokenizer = IncrementalDetokenizer.from_new_request(self.tokenizer, request)
        detokenizer.update(list(streamed), stop_terminated=False)
        detokenizer.get_next_output_text(False, delta=True)
        return detokenizer


def _payload(text: Any) -> dict | None:
    """The JSON object of one SSE ``data:`` line, or None (``[DONE]``, or not SSE)."""
    if not isinstance(text, str) or not text.startswith("data: "):
        return None
    body = text[len("data: "):].strip()
    if body == _DONE:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _as_chat_chunk(payload: dict) -> dict:
    """A completions chunk as a chat completion chunk (text becomes the delta's content)."""
    choices = []
    for choice in payload.get("choices") or ():
        chat_choice = {"index": choice.get("index", 0), "delta": {"content": choice.get("text", "")},
                       "logprobs": None, "finish_reason": choice.get("finish_reason")}
        if choice.get("token_ids") is not None:
            chat_choice["token_ids"] = choice["token_ids"]
        choices.append(chat_choice)
    chunk = dict(payload, object="chat.completion.chunk", choices=choices)
    return chunk
