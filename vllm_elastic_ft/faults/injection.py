"""The rank side of fault injection: an opt-in hook the watchdog and the recovery core call.

A drill or a test writes injection knobs into the group's store
(``faults.set_slow``, ``faults.set_rebuild_delay``); a rank reads them only if
its deployment switched ``fault_injection`` on, through one
:class:`FaultInjection` object handed to its watchdog and its recovery core.
With it off there is no such object: no injection key is read and no
injection code runs on the serving path (``tests/test_fault_injection.py``).
"""

from __future__ import annotations

import time

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)


class FaultInjection:
    """Injection knobs of one rank (stable id ``rank_id``) of ``group``.

    Args:
        store: the group's store.
        group: the group's name.
        rank_id: the rank's stable id (its DP rank), which a rebuild never changes.
    """

    def __init__(self, store, group: str, rank_id: int):
        self.store = store
        self.group = group
        self.rank_id = rank_id
        self.slow_delay_s = 0.0

    def refresh(self) -> None:
        """Re-read this rank's 'slow' delay (the watchdog's tick calls this)."""
        delay = self._read_float(keys.inject_slow(self.group, self.rank_id))
        if delay != self.slow_delay_s:
            logger.warning("rank %d: injected delay per guarded call now %.3fs", self.rank_id,
                           delay)
            self.slow_delay_s = delay

    def before_exchange(self) -> None:
        """A 'slow' rank reaches the exchange late, as one whose compute or host is slow."""
        if self.slow_delay_s:
            time.sleep(self.slow_delay_s)

    def hold_rebuild(self) -> None:
        """Hold a rebuild after the fence (room for a second fault to land in it)."""
        held = self._read_float(keys.inject_rebuild_delay(self.group)) or \
            self._read_float(keys.inject_rebuild_delay(self.group, self.rank_id))
        if held:
            logger.warning("rank %d: rebuild held %.2fs (injected)", self.rank_id, held)
            time.sleep(held)

    def _read_float(self, key: str) -> float:
        return float(self.store.get(key)) if self.store.check([key]) else 0.0


def injection_for(config, store, group: str, rank_id: int) -> FaultInjection | None:
    """The hook when ``config.fault_injection`` is on, else None (nothing is read)."""
    return FaultInjection(store, group, rank_id) if config.fault_injection else None
