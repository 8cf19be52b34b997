"""Fault injection: kill, stop or slow one rank, the same way for tests, drills and users.

* ``kill``: SIGKILL the rank's process (a crash: no clean-up runs);
* ``stop`` / ``cont``: SIGSTOP, later SIGCONT (a hang, then a stale rank waking up);
* ``slow``: an added delay inside every guarded dispatch/combine of the rank,
  published in the watchdog store (the rank's watchdog picks it up within one
  heartbeat interval); a delay of 0 clears it. Store knobs (``slow``, the
  rebuild hold) take effect only in a deployment started with
  ``fault_injection: true`` (see ``injection.py``, the rank side).

In a vLLM deployment a rank is found by the process title vLLM gives it:
``VLLM::Worker_DP<r>...`` (the worker, where dispatch/combine run) or
``VLLM::EngineCore_DP<r>`` (its engine core).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

SIGNAL_FAULTS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}
FAULT_KINDS = tuple(SIGNAL_FAULTS) + ("slow",)
PROCESS_ROLES = ("worker", "engine")


@dataclass(frozen=True)
class Injection:
    kind: str
    pid: int | None
    rank: int | None
    at: float  # time.time() when the signal was sent / the delay published


def signal_process(kind: str, pid: int, rank: int | None = None) -> Injection:
    """Send the signal of fault ``kind`` (kill, stop, cont) to ``pid``."""
    if kind not in SIGNAL_FAULTS:
        raise ValueError(f"kind must be one of {list(SIGNAL_FAULTS)}, got {kind!r}")
    at = time.time()
    os.kill(pid, SIGNAL_FAULTS[kind])
    logger.warning("fault injected: %s pid %d (rank %s)", kind, pid, rank)
    return Injection(kind, pid, rank, at)


def set_slow(store, group: str, rank: int, delay_s: float) -> Injection:
    """Add ``delay_s`` to every guarded call of ``rank`` (0 clears it)."""
    if delay_s < 0:
        raise ValueError(f"delay_s must be >= 0, got {delay_s}")
    store.set(keys.inject_slow(group, rank), str(float(delay_s)))
    logger.warning("fault injected: slow rank %d by %.3fs per call", rank, delay_s)
    return Injection("slow", None, rank, time.time())


def set_rebuild_delay(store, group: str, delay_s: float, rank_id: int | None = None
                      ) -> Injection:
    """Hold every rank of ``group`` (or only stable rank ``rank_id``) for ``delay_s`` inside
    its next rebuilds (after the fence, before the agreement): room for a second fault to
    land during a rebuild, or a straggler the agreement's leader waits for."""
    if delay_s < 0:
        raise ValueError(f"delay_s must be >= 0, got {delay_s}")
    store.set(keys.inject_rebuild_delay(group, rank_id), str(float(delay_s)))
    logger.warning("fault injected: rebuilds of group %s%s held for %.3fs", group,
                   "" if rank_id is None else f" rank {rank_id}", delay_s)
    return Injection("rebuild_delay", None, None, time.time())


def find_rank_processes(server_pid: int) -> dict[int, dict[str, int]]:
    """``{dp_rank: {"worker": pid, "engine": pid}}`` under a vLLM server process."""
    import psutil

    found: dict[int, dict[str, int]] = {}
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for role, marker in (("worker", "VLLM::Worker_DP"), ("engine", "VLLM::EngineCore_DP")):
            if title.startswith(marker):
                rank = int(title[len(marker):].split("_")[0].split()[0])
                found.setdefault(rank, {})[role] = child.pid
    return found


def rank_pid(server_pid: int, rank: int, role: str = "worker") -> int:
    """The pid of ``role`` (worker or engine) of DP rank ``rank`` under ``server_pid``."""
    if role not in PROCESS_ROLES:
        raise ValueError(f"role must be one of {list(PROCESS_ROLES)}, got {role!r}")
    processes = find_rank_processes(server_pid)
    try:
        return processes[rank][role]
    except KeyError:
        raise LookupError(
            f"no {role} process of DP rank {rank} under pid {server_pid}; found {processes}"
        ) from None
