"""The worker ends its watchdog's warm-up grace when vLLM's warm-up is over (issue 12): the
first serving calls must not get the warm-up deadline. ``patches/worker/worker_start.py``
calls ``worker_watchdog.serving_started`` after ``compile_or_warm_up_model``."""

from __future__ import annotations

import inspect

from vllm_elastic_ft.vllm import worker_watchdog
from vllm_elastic_ft.vllm.patches.worker import worker_start


class _Watchdog:
    def __init__(self):
        self.ended = 0

    def end_warmup(self) -> None:
        self.ended += 1


def test_serving_started_ends_the_grace_of_the_watchdog_now_or_when_it_is_built(monkeypatch):
    watchdog = _Watchdog()
    monkeypatch.setattr(worker_watchdog, "_watchdog", watchdog)
    monkeypatch.setattr(worker_watchdog, "_serving", False)
    worker_watchdog.serving_started()
    assert watchdog.ended == 1
    # No watchdog yet (it is built at the first guarded call): it starts out of warm-up.
    monkeypatch.setattr(worker_watchdog, "_watchdog", None)
    monkeypatch.setattr(worker_watchdog, "_serving", False)
    worker_watchdog.serving_started()
    assert worker_watchdog._serving is True


def test_the_warm_up_patch_signals_serving_after_vllms_warm_up(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(worker_start, "attached_worker_group", lambda w: calls.append("group"))
    monkeypatch.setattr(worker_start, "serving_started", lambda: calls.append("serving"))
    patched = worker_start._make_compile_or_warm_up_model(lambda self: calls.append("vllm"))
    patched(object())
    assert calls == ["vllm", "group", "serving"]
    assert "serving_started()" in inspect.getsource(worker_start._make_compile_or_warm_up_model)
