"""Rejoin in place on Ray Serve, piece by piece (``ray_serve/rejoin.py``): the admission a
joiner posts in a real TCPStore, each live replica's part of it, and rank 0's coordinator.
The engines are stand-ins that record calls (the e2e test runs the real ones)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from types import SimpleNamespace

import torch.distributed as dist

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.ray_serve.rejoin import AdmissionWatcher, publish_coordinator


def _store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


class _RecordingLLM:
    """What a live replica's AsyncLLM is asked to do, in order."""

    def __init__(self, admit_error: Exception | None = None):
        self.calls: list[tuple] = []
        self.admit_error = admit_error
        self.engine_core = SimpleNamespace(call_utility_async=self._utility)

    async def pause_generation(self, mode: str, clear_cache: bool):
        self.calls.append(("pause", mode, clear_cache))

    async def resume_generation(self):
        self.calls.append(("resume",))

    async def _utility(self, method: str, *args):
        self.calls.append((method, *args))
        if self.admit_error is not None:
            raise self.admit_error
        return [3, [0, 1, 2]]


def _post(store, rank: int, ticket: str) -> int:
    number = store.add(keys.serve_admissions(), 1)
    store.set(keys.serve_admission(number), json.dumps({"rank": rank, "ticket": ticket}))
    return number


async def _watch_until(store, watcher: AdmissionWatcher, done_key: str,
                       settle_s: float = 0.1) -> None:
    """Let ``watcher`` run until ``done_key`` is written (at most 5 s), then stop it."""
    for _ in range(50):
        if store.check([done_key]):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(settle_s)
    watcher._task.cancel()


def test_a_live_replica_pauses_admits_and_resumes_and_answers_in_the_store():
    store = _store()
    _post(store, 2, "old-ticket")  # posted before this replica started: history
    llm = _RecordingLLM()
    watcher = AdmissionWatcher(store, 0, lambda: llm, lambda: True, timeout_s=5.0)

    async def scenario():
        watcher.start()
        await asyncio.sleep(0.4)
        number = _post(store, 2, "2-abc")
        await _watch_until(store, watcher, keys.serve_admission_done(number, 0))
        return number

    number = asyncio.run(scenario())
    assert llm.calls == [("pause", "keep", False), ("elastic_ft_admit", 2, "2-abc", 0),
                         ("resume",)], "keep-mode pause, the admission, then resume"
    answer = json.loads(store.get(keys.serve_admission_done(number, 0)))
    assert answer["ok"] and answer["epoch"] == 3 and answer["members"] == [0, 1, 2]


def test_the_joiner_and_a_replica_that_is_not_a_member_take_no_part():
    store = _store()
    joiner_llm, lost_llm = _RecordingLLM(), _RecordingLLM()
    joiner = AdmissionWatcher(store, 2, lambda: joiner_llm, lambda: True, timeout_s=5.0)
    lost = AdmissionWatcher(store, 1, lambda: lost_llm, lambda: False, timeout_s=5.0)
    gone = AdmissionWatcher(store, 0, lambda: None, lambda: True, timeout_s=5.0)

    async def scenario():
        for w in (joiner, lost, gone):
            w.start()
        await asyncio.sleep(0.4)
        _post(store, 2, "2-def")
        await asyncio.sleep(0.8)
        for w in (joiner, lost, gone):
            w._task.cancel()

    asyncio.run(scenario())
    assert joiner_llm.calls == [] and lost_llm.calls == []
    assert not store.check([keys.serve_admission_done(1, r) for r in (0, 1, 2)])


def test_a_failed_admission_still_resumes_and_says_why():
    store = _store()
    llm = _RecordingLLM(admit_error=TimeoutError("joiner never arrived"))
    watcher = AdmissionWatcher(store, 1, lambda: llm, lambda: True, timeout_s=5.0)

    async def scenario():
        watcher.start()
        await asyncio.sleep(0.4)
        number = _post(store, 0, "0-xyz")
        await _watch_until(store, watcher, keys.serve_admission_done(number, 1))
        return number

    number = asyncio.run(scenario())
    assert llm.calls[-1] == ("resume",), "the engine is never left paused"
    answer = json.loads(store.get(keys.serve_admission_done(number, 1)))
    assert answer == {"ok": False, "error": "TimeoutError: joiner never arrived"}


def test_rank_0_publishes_its_coordinator_and_keeps_it_past_its_engine():
    class Coordinator:
        def get_engine_socket_addresses(self):
            return "tcp://10.0.0.1:1", "tcp://10.0.0.1:2"

        def get_stats_publish_address(self):
            return "tcp://10.0.0.1:3"

    coordinator = Coordinator()
    resources = SimpleNamespace(coordinator=coordinator)
    llm = SimpleNamespace(engine_core=SimpleNamespace(resources=resources))
    store = _store()
    assert publish_coordinator(store, llm) is coordinator
    assert json.loads(store.get(keys.serve_coordinator())) == {
        "input": "tcp://10.0.0.1:1", "output": "tcp://10.0.0.1:2", "stats": "tcp://10.0.0.1:3"}
    assert resources.coordinator is None, \
        "vLLM's client shutdown (its engine died) must not take the gang's coordinator with it"
