"""Deadline slots checked by one monitor thread: the native core or its Python twin.

This is the only module that imports the compiled ``_watchdog_core``. Both
backends have the same interface: ``arm(slot, timeout_s, seq)`` before a call,
``disarm(slot)`` after it, and ``on_miss(slot, seq, overdue_s)`` called on the
monitor thread once per armed call whose deadline passed. ``on_miss`` must not
block (the watchdog only enqueues the miss).

The native core arms with two atomic stores; the Python fallback takes a lock
and is used, with a log line, when the extension was not built.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

OnMiss = Callable[[int, int, float], None]

try:  # built by setup.py (scripts/setup.sh runs build_ext --inplace)
    from vllm_elastic_ft import _watchdog_core as _native
except ImportError as err:  # pragma: no cover - exercised when the build is absent
    _native = None
    _native_error = str(err)
else:
    _native_error = ""


class DeadlineMonitor(Protocol):
    def arm(self, slot: int, timeout_s: float, seq: int) -> None: ...
    def disarm(self, slot: int) -> None: ...
    def stop(self) -> None: ...
    @property
    def misses(self) -> int: ...


class PythonMonitor:
    """Pure-Python twin of the native ``Monitor`` (same contract, slower arm)."""

    def __init__(self, num_slots: int, poll_interval_s: float, on_miss: OnMiss):
        if not 1 <= num_slots <= 4096:
            raise ValueError("num_slots must be in [1, 4096]")
        if not 0 < poll_interval_s <= 1:
            raise ValueError("poll_interval_s must be in (0, 1]")
        self._deadline = [0.0] * num_slots  # 0.0: disarmed
        self._seq = [0] * num_slots
        self._fired = [-1] * num_slots
        self._poll_s = poll_interval_s
        self._on_miss = on_miss
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.misses = 0
        self._thread = threading.Thread(target=self._loop, name="elastic-ft-monitor", daemon=True)
        self._thread.start()

    def arm(self, slot: int, timeout_s: float, seq: int) -> None:
        with self._lock:
            self._seq[slot] = seq
            self._deadline[slot] = time.monotonic() + timeout_s

    def disarm(self, slot: int) -> None:
        self._deadline[slot] = 0.0

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stopped.wait(self._poll_s):
            now = time.monotonic()
            for slot, deadline in enumerate(self._deadline):
                if deadline == 0.0 or now < deadline:
                    continue
                with self._lock:
                    seq = self._seq[slot]
                    if self._deadline[slot] != deadline or self._fired[slot] == seq:
                        continue
                    self._fired[slot] = seq
                self.misses += 1
                try:
                    self._on_miss(slot, seq, now - deadline)
                except Exception:  # the monitor thread must survive its callbacks
                    logger.exception("deadline callback failed")


def native_available() -> bool:
    return _native is not None


def backend_name() -> str:
    return "native" if _native is not None else f"python (native core unavailable: {_native_error})"


def make_monitor(
    num_slots: int, poll_interval_s: float, on_miss: OnMiss, prefer_native: bool = True
) -> DeadlineMonitor:
    """A started monitor: the native core if built (and preferred), else the Python one."""
    if prefer_native and _native is not None:
        return _native.Monitor(num_slots, poll_interval_s, on_miss)
    if prefer_native:
        logger.warning("vllm-elastic-ft: native watchdog core unavailable (%s); "
                       "using the Python deadline monitor", _native_error)
    return PythonMonitor(num_slots, poll_interval_s, on_miss)
