"""A bounded, closed-loop completion load against an OpenAI-compatible server.

``run_load`` keeps ``concurrency`` requests in flight until ``num_requests``
have been sent, and records each request's start, end, output tokens and
error. Benchmarks turn the records into tokens/s; the failure drill turns them
into a requests/s timeline and counts lost requests. Plain completions go over
``urllib``; streaming ones (``stream_every``) through the official OpenAI client
with ``max_retries=0``, as a user's client would stream them.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class RequestRecord:
    index: int
    prompt: str
    start: float
    end: float
    ok: bool
    output_tokens: int = 0
    token_ids: list[int] | None = None
    error: str | None = None
    attempts: int = 1
    stream: bool = False


@dataclass
class LoadSummary:
    records: list[RequestRecord]
    wall_s: float

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.records)

    @property
    def failed(self) -> int:
        return len(self.records) - self.ok

    @property
    def retried(self) -> int:
        """Tries after the first, over all requests (only 503 refusals are retried)."""
        return sum(r.attempts - 1 for r in self.records)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.records if r.ok)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


def complete_once(
    url: str, prompt: str, max_tokens: int, timeout_s: float, model: str = "tiny-moe"
) -> list[int]:
    """One greedy completion; returns its output token ids (raises on any error)."""
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
    ).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        payload = json.loads(resp.read())
    choice = payload["choices"][0]
    # A 200 can carry a request the server gave up on (finish_reason "abort" or "error",
    # with the tokens it had): that is a lost request, not a completion.
    if choice.get("finish_reason") not in ("length", "stop"):
        raise RuntimeError(f"request ended with finish_reason={choice.get('finish_reason')!r} "
                           f"after {len(choice.get('token_ids') or [])} token(s)")
    return list(choice["token_ids"])


def stream_once(
    url: str, prompt: str, max_tokens: int, timeout_s: float, model: str = "tiny-moe"
) -> list[int]:
    """One greedy streaming completion through the official OpenAI client (it never
    retries: ``max_retries=0``); returns the output token ids its chunks carried (raises on
    any error, an error inside the stream included)."""
    from openai import OpenAI

    tokens: list[int] = []
    finish_reason = None
    with OpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0,
                timeout=timeout_s) as client:
        for chunk in client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                stream=True, extra_body={"ignore_eos": True, "return_token_ids": True}):
            for choice in chunk.choices:
                tokens.extend(getattr(choice, "token_ids", None) or [])
                finish_reason = choice.finish_reason or finish_reason
    if finish_reason not in ("length", "stop"):
        raise RuntimeError(f"stream ended with finish_reason={finish_reason!r} after "
                           f"{len(tokens)} token(s)")
    return tokens


def _refused(err: Exception) -> bool:
    """Whether ``err`` is a 503 refusal (the group is fenced: the one retriable answer)."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code == 503
    return getattr(err, "status_code", None) == 503  # openai.APIStatusError


def run_load(
    url: str,
    prompts: Sequence[str],
    num_requests: int,
    concurrency: int,
    max_tokens: int = 32,
    timeout_s: float = 300.0,
    on_record: Callable[[RequestRecord], None] | None = None,
    progress_every_s: float | None = 10.0,
    retry_for_s: float = 0.0,
    stream_every: int = 0,
) -> LoadSummary:
    """Send ``num_requests`` completions, ``concurrency`` at a time (closed loop).

    ``stream_every`` = n > 0 streams every n-th request (index 0, n, 2n, ...; 2: half
    of them) through the OpenAI client; 0 streams none.

    ``retry_for_s`` > 0 plays an ingress that retries what the design says is
    retriable, and only that: a request refused with 503 (the group is fenced or
    rebuilding: ``/v1/*`` answer 503 + ``Retry-After`` then) is sent again every
    0.25 s until it succeeds or ``retry_for_s`` has passed since its first
    attempt. Any other failure (a 500, an error inside a stream, a dropped or
    refused connection, a timeout) is final: it is the request lost.
    ``RequestRecord.attempts`` counts the tries (``LoadSummary.retried``).
    """
    if stream_every > 0:
        # Imported before the first request: the first import of the OpenAI client takes
        # a second or more here, and a caller that times a fault after the load started
        # (a kill 2 s in) would otherwise meet requests that have not reached the server.
        import openai  # noqa: F401
    lock = threading.Lock()
    records: list[RequestRecord] = []
    t0 = time.monotonic()
    last_note = [t0]

    def one(index: int) -> None:
        prompt = prompts[index % len(prompts)]
        stream = stream_every > 0 and index % stream_every == 0
        send = stream_once if stream else complete_once
        start = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                tokens = send(url, prompt, max_tokens, timeout_s)
                record = RequestRecord(index, prompt, start, time.monotonic(), True,
                                       len(tokens), tokens, attempts=attempts, stream=stream)
                break
            except Exception as err:  # noqa: BLE001 - every failure is recorded: a lost request
                if _refused(err) and time.monotonic() - start < retry_for_s:
                    time.sleep(0.25)
                    continue
                detail = err.read().decode(errors="replace")[:200] if isinstance(
                    err, urllib.error.HTTPError) else ""
                record = RequestRecord(index, prompt, start, time.monotonic(), False,
                                       error=f"{type(err).__name__}: {err} {detail}".strip(),
                                       attempts=attempts, stream=stream)
                break
        with lock:
            records.append(record)
            now = time.monotonic()
            if progress_every_s and now - last_note[0] >= progress_every_s:
                last_note[0] = now
                done = len(records)
                print(f"[load] {done}/{num_requests} requests done, "
                      f"{sum(not r.ok for r in records)} failed, {now - t0:.0f}s", flush=True)
        if on_record:
            on_record(record)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(num_requests)))
    records.sort(key=lambda r: r.index)
    return LoadSummary(records, time.monotonic() - t0)
