"""A stream whose rank was lost continues elsewhere: prompt + streamed tokens, the rest of its
budget, the original stream's shape (``ray_serve/continuation.py``). No Ray, no engine."""

from __future__ import annotations

import json

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from vllm_elastic_ft.ray_serve.continuation import StreamContinuation
from vllm_elastic_ft.vllm.continuation import remaining_budget


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chunk(text: str, ids: list[int], finish=None, prompt_ids=None, cid="cmpl-1") -> str:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish}
    if prompt_ids is not None:
        choice["prompt_token_ids"] = prompt_ids
    return _sse({"id": cid, "object": "text_completion", "created": 7, "model": "m",
                 "choices": [choice]})


def test_the_budget_rule_is_shared_and_exact():
    assert remaining_budget(10, 4, 3) == (7, 1)
    assert remaining_budget(10, 0, 10) is None
    assert remaining_budget(None, 2, 5) == (None, 0)


def test_a_completions_stream_continues_after_the_tokens_the_client_has():
    request = CompletionRequest(model="m", prompt="hi", max_tokens=10, min_tokens=4,
                                temperature=0.0, ignore_eos=True, stream=True, seed=3)
    tracker = StreamContinuation.start(request, "completions")
    assert request.return_token_ids is True, "the engine is asked for token ids"
    shown, errored = tracker.observe([_chunk("a", [5], prompt_ids=[1, 2]), _chunk("b", [6])])
    assert not errored and all("token_ids" not in s for s in shown), "ids the client never asked for"
    assert json.loads(shown[1][6:])["choices"][0]["text"] == "b"
    error = _sse({"error": {"message": "EngineCore encountered an issue", "code": 500}})
    shown, errored = tracker.observe([_chunk("c", [7]), error, "data: [DONE]\n\n"])
    assert errored and len(shown) == 2 and "[DONE]" in shown[1]
    cont = tracker.request()
    assert cont.prompt == [1, 2, 5, 6, 7] and cont.max_tokens == 7 and cont.min_tokens == 1
    assert cont.temperature == 0.0 and cont.ignore_eos and cont.seed == 3 and cont.stream
    adapted = json.loads(tracker.adapt([_chunk("d", [8], cid="cmpl-other")])[0][6:])
    assert adapted["id"] == "cmpl-1" and adapted["choices"][0]["text"] == "d"
    assert "token_ids" not in adapted["choices"][0]


def test_a_chat_stream_continues_as_chat_chunks_from_its_templated_prompt_ids():
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    max_completion_tokens=6, stream=True, temperature=0.0)
    tracker = StreamContinuation.start(request, "chat")
    assert tracker is not None and request.return_token_ids is True
    role = _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 9,
                 "model": "m", "prompt_token_ids": [11, 12, 13],
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}]})
    word = _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 9,
                 "model": "m", "choices": [{"index": 0, "delta": {"content": "x"},
                                            "token_ids": [21], "finish_reason": None}]})
    shown, _ = tracker.observe([role, word])
    assert "prompt_token_ids" not in shown[0]
    cont = tracker.request()
    assert cont.prompt == [11, 12, 13, 21] and cont.max_tokens == 5
    chunk = json.loads(tracker.adapt(_chunk("y", [22], finish="length", cid="cmpl-9"))[6:])
    assert chunk["id"] == "chatcmpl-1" and chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["delta"] == {"content": "y"}
    assert chunk["choices"][0]["finish_reason"] == "length"


def test_a_finished_stream_or_one_that_cannot_be_continued_is_said_so():
    request = CompletionRequest(model="m", prompt="hi", max_tokens=2, stream=True)
    tracker = StreamContinuation.start(request, "completions")
    tracker.observe(_chunk("a", [5], prompt_ids=[1]))
    tracker.observe(_chunk("b", [6], finish="length"))
    assert tracker.finished and tracker.request() is None
    assert StreamContinuation.start(CompletionRequest(model="m", prompt="x"), "completions") is None
    assert StreamContinuation.start(CompletionRequest(model="m", prompt="x", n=2, stream=True),
                                    "completions") is None


def test_a_client_that_asked_for_token_ids_keeps_them():
    request = CompletionRequest(model="m", prompt="hi", max_tokens=5, stream=True,
                                return_token_ids=True)
    tracker = StreamContinuation.start(request, "completions")
    shown, _ = tracker.observe(_chunk("a", [5], prompt_ids=[1]))
    assert json.loads(shown[6:])["choices"][0]["token_ids"] == [5]


def _tiny_tokenizer():
    from vllm.tokenizers import get_tokenizer

    from vllm_elastic_ft.testing.tiny_moe import build_tiny_moe

    return get_tokenizer(str(build_tiny_moe()))


def _engine_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """What vLLM's front end streams for ``ids`` after ``prompt_ids`` (all deltas joined)."""
    from types import SimpleNamespace

    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer.from_new_request(tokenizer, SimpleNamespace(
        request_id="r", prompt_token_ids=prompt_ids, sampling_params=SamplingParams()))
    text = ""
    for i, token in enumerate(ids):
        detok.update([token], stop_terminated=False)
        text += detok.get_next_output_text(i == len(ids) - 1, delta=True)
    return text


def test_a_continued_stream_has_the_no_fault_text_when_the_cut_is_inside_a_character():
    """The CI failure of stop 14: the continuation's prompt ended in the middle of a multi-byte
    character, and the serving engine's first chunk held the whole prompt decoded. The
    tracker re-detokenizes with vLLM's detokenizer over the original prompt: the client's
    text is the no-fault text (what the engine would have streamed without the fault)."""
    tokenizer = _tiny_tokenizer()
    prompt_ids = tokenizer.encode("user: The quick brown fox\nassistant:")
    # Byte tokens that are not valid UTF-8 on their own (what a random model emits).
    generated = [226, 99, 47, 171, 255, 264, 311, 255, 226, 413, 369, 450]
    reference = _engine_text(tokenizer, prompt_ids, generated)
    # The bug, as vLLM has it: a detokenizer primed with prompt + the first 4 tokens.
    buggy = _engine_text(tokenizer, prompt_ids + generated[:4], generated[4:])
    assert not reference.startswith("user:") and buggy.startswith("user:"), (reference, buggy)

    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    max_completion_tokens=12, stream=True, temperature=0.0)
    tracker = StreamContinuation.start(request, "chat", tokenizer)
    streamed = _engine_text(tokenizer, prompt_ids, generated[:4])
    role = _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 9,
                 "model": "m", "prompt_token_ids": prompt_ids,
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}]})
    first = _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 9,
                  "model": "m", "choices": [{"index": 0, "delta": {"content": streamed},
                                             "token_ids": generated[:4],
                                             "finish_reason": None}]})
    tracker.observe([role, first])
    cont = tracker.request()
    assert cont.prompt == prompt_ids + generated[:4] and cont.max_tokens == 8
    # The serving engine's chunks, with the text its (mis-primed) detokenizer wrote.
    rest = generated[4:]
    chunks = [_chunk(buggy if i == 0 else "", [t], finish="length" if i == len(rest) - 1
                     else None) for i, t in enumerate(rest)]
    texts = [json.loads(tracker.adapt(c)[6:])["choices"][0]["delta"]["content"] for c in chunks]
    assert streamed + "".join(texts) == reference
