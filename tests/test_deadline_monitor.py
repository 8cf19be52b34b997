"""Both deadline monitors (native core and Python fallback) keep the same contract."""

import threading
import time

import pytest

from vllm_elastic_ft.watchdog import deadline_monitor
from vllm_elastic_ft.watchdog.deadline_monitor import PythonMonitor, make_monitor

BACKENDS = ["python"] + (["native"] if deadline_monitor.native_available() else [])


def _monitor(backend, on_miss, poll=0.002):
    return make_monitor(2, poll, on_miss, prefer_native=backend == "native")


def test_native_core_is_built():
    # scripts/setup.sh builds csrc/; CI must exercise the native path.
    assert deadline_monitor.native_available(), deadline_monitor.backend_name()


@pytest.mark.parametrize("backend", BACKENDS)
def test_miss_fires_once_per_armed_call_with_slot_and_seq(backend):
    misses, fired = [], threading.Event()

    def on_miss(slot, seq, overdue_s):
        misses.append((slot, seq, overdue_s, time.monotonic()))
        fired.set()

    mon = _monitor(backend, on_miss)
    assert (backend == "python") == isinstance(mon, PythonMonitor)
    try:
        armed_at = time.monotonic()
        mon.arm(1, 0.05, 7)
        assert fired.wait(2.0)
        time.sleep(0.05)  # still armed: must not fire again for the same call
        assert [(s, q) for s, q, _, _ in misses] == [(1, 7)]
        slot, seq, overdue, at = misses[0]
        assert 0.05 <= at - armed_at < 0.5 and overdue >= 0
        assert mon.misses == 1
    finally:
        mon.stop()
        mon.stop()  # idempotent


@pytest.mark.parametrize("backend", BACKENDS)
def test_disarmed_in_time_never_fires(backend):
    misses = []
    mon = _monitor(backend, lambda *a: misses.append(a))
    try:
        for seq in range(200):
            mon.arm(0, 0.2, seq)
            mon.disarm(0)
        mon.arm(0, 10.0, 999)  # armed, far from its deadline
        time.sleep(0.1)
        assert misses == [] and mon.misses == 0
    finally:
        mon.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_callback_exception_does_not_kill_the_monitor(backend):
    seen = []

    def on_miss(slot, seq, overdue_s):
        seen.append(seq)
        if seq == 1:
            raise RuntimeError("boom")

    mon = _monitor(backend, on_miss)
    try:
        mon.arm(0, 0.01, 1)
        time.sleep(0.1)
        mon.arm(0, 0.01, 2)
        time.sleep(0.1)
        assert seen == [1, 2]
    finally:
        mon.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_are_rejected(backend):
    with pytest.raises(ValueError, match="num_slots"):
        make_monitor(0, 0.01, lambda *a: None, prefer_native=backend == "native")
    mon = _monitor(backend, lambda *a: None)
    try:
        with pytest.raises(IndexError):
            mon.arm(5, 1.0, 1)
    finally:
        mon.stop()
