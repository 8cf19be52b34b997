"""The ingress finishes a request whose replica process died (``ray_serve/ingress.py``).

Ray's handle call (``OpenAiIngress._get_response``) is replaced by a script of
streams; everything else is the real ingress subclass and the real tracker."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray.serve.llm")

from ray.exceptions import ActorDiedError  # noqa: E402
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress  # noqa: E402
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import CompletionRequest  # noqa: E402

from vllm_elastic_ft.ray_serve.ingress import ElasticOpenAiIngress  # noqa: E402


def _chunk(text: str, ids: list[int], finish=None, prompt_ids=None, cid="cmpl-1") -> str:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    if prompt_ids is not None:
        choice["prompt_token_ids"] = prompt_ids
    payload = {"id": cid, "object": "text_completion", "created": 7, "model": "m",
               "choices": [choice]}
    return f"data: {json.dumps(payload)}\n\n"


class _Script:
    """Ray's handle call, one scripted stream per call: items, then maybe the replica dies."""

    def __init__(self, *streams):
        self.streams = list(streams)
        self.calls: list[tuple[str, object]] = []

    async def __call__(self, _ingress, *, body, call_method, raw_request=None):
        self.calls.append((call_method, body.model_copy(deep=True)))
        items, dies = self.streams.pop(0)
        for item in items:
            yield item
        if dies:
            raise ActorDiedError()


def _run(ingress, body, method: str) -> list:
    async def collect():
        return [item async for item in ingress._get_response(body=body, call_method=method)]
    return asyncio.run(collect())


def _ingress(monkeypatch, script: _Script, attempts: int = 3) -> ElasticOpenAiIngress:
    monkeypatch.setattr(OpenAiIngress, "_get_response", lambda self, **kw: script(self, **kw))
    return ElasticOpenAiIngress({"m": object()}, {"m": object()}, attempts=attempts)


def _texts(items: list) -> list[str]:
    out = []
    for item in items:
        for text in item if isinstance(item, list) else [item]:
            body = text[len("data: "):].strip()
            if body != "[DONE]":
                out.append(json.loads(body)["choices"][0].get("text") or
                           json.loads(body)["choices"][0].get("delta", {}).get("content"))
    return out


def test_a_stream_whose_replica_died_continues_after_the_tokens_its_client_has(monkeypatch):
    script = _Script(([_chunk("a", [5], prompt_ids=[1, 2]), _chunk("b", [6])], True),
                     ([_chunk("c", [7], cid="cmpl-9"), _chunk("d", [8], finish="length",
                                                              cid="cmpl-9")], False))
    ingress = _ingress(monkeypatch, script)
    body = CompletionRequest(model="m", prompt="hi", max_tokens=4, stream=True,
                             temperature=0.0, ignore_eos=True)
    items = _run(ingress, body, "completions")
    assert _texts(items) == ["a", "b", "c", "d"]
    assert all("token_ids" not in str(i) for i in items), "ids the client never asked for"
    assert all("cmpl-9" not in str(i) for i in items), "the continuation has the stream's id"
    (first_method, _), (method, continuation) = script.calls
    assert first_method == "completions" and method == "completions"
    assert continuation.prompt == [1, 2, 5, 6] and continuation.max_tokens == 2
    assert continuation.temperature == 0.0 and continuation.ignore_eos
    assert asyncio.run(ingress.elastic_ft_counts()) == {"continued": 1}


def test_a_chat_stream_continues_as_chat_chunks(monkeypatch):
    role = "data: " + json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                  "created": 9, "model": "m", "prompt_token_ids": [11, 12],
                                  "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                     "content": ""},
                                               "finish_reason": None}]}) + "\n\n"
    script = _Script(([role], True), ([_chunk("y", [22], finish="length")], False))
    ingress = _ingress(monkeypatch, script)
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 max_completion_tokens=3, stream=True)
    items = _run(ingress, body, "chat")
    last = json.loads(items[-1][len("data: "):])
    assert last["object"] == "chat.completion.chunk" and last["id"] == "chatcmpl-1"
    assert last["choices"][0]["delta"] == {"content": "y"}
    assert script.calls[1][0] == "completions" and script.calls[1][1].prompt == [11, 12]


def test_a_request_whose_replica_died_before_answering_is_sent_again_whole(monkeypatch):
    answer = object()  # a plain response passes through as it is
    script = _Script(([], True), ([answer], False))
    ingress = _ingress(monkeypatch, script)
    body = CompletionRequest(model="m", prompt="hi", max_tokens=4)
    assert _run(ingress, body, "completions") == [answer]
    assert [m for m, _ in script.calls] == ["completions", "completions"]
    assert script.calls[1][1].prompt == "hi"
    assert asyncio.run(ingress.elastic_ft_counts()) == {"resent": 1}


def test_a_stream_that_had_every_token_only_gets_its_done(monkeypatch):
    script = _Script(([_chunk("a", [5], prompt_ids=[1]), _chunk("b", [6], finish="length")],
                      True))
    ingress = _ingress(monkeypatch, script)
    body = CompletionRequest(model="m", prompt="hi", max_tokens=2, stream=True)
    items = _run(ingress, body, "completions")
    assert _texts(items) == ["a", "b"] and items[-1] == ["data: [DONE]\n\n"]
    assert len(script.calls) == 1


def test_the_client_gets_the_error_after_the_last_attempt(monkeypatch):
    script = _Script(([], True), ([], True))
    ingress = _ingress(monkeypatch, script, attempts=2)
    with pytest.raises(ActorDiedError):
        _run(ingress, CompletionRequest(model="m", prompt="hi", max_tokens=4), "completions")
    assert len(script.calls) == 2
    assert asyncio.run(ingress.elastic_ft_counts()) == {"resent": 1, "gave_up": 1}


def test_an_error_chunk_of_a_living_replica_reaches_the_client(monkeypatch):
    error = "data: " + json.dumps({"error": {"message": "bad", "code": 400}}) + "\n\n"
    script = _Script(([error], False))
    ingress = _ingress(monkeypatch, script)
    body = CompletionRequest(model="m", prompt="hi", max_tokens=4, stream=True)
    assert _run(ingress, body, "completions") == [error]
