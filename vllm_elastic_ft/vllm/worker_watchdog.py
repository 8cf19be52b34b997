"""The rank watchdog of a vLLM worker process (where dispatch and combine run).

Built at the first guarded call, when the DP group exists: the group's name is
``dp``, the rank is the worker's rank in the DP group, the store is the one
the front end exported. Reports go to the default sink (a log line in the
worker's log, and counters).
"""

from __future__ import annotations

import atexit

from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.process_config import process_config
from vllm_elastic_ft.vllm.watchdog_store import store_address
from vllm_elastic_ft.watchdog.rank_watchdog import RankWatchdog, WatchdogSettings

logger = get_logger(__name__)

GROUP_NAME = "dp"

_watchdog: RankWatchdog | None = None
_disabled = False
_serving = False  # vLLM's warm-up is over in this worker (serving_started)


def process_watchdog(rank: int, world_size: int) -> RankWatchdog | None:
    """This worker's watchdog (``rank`` of ``world_size`` in the DP group), or None when off."""
    global _watchdog, _disabled
    if _watchdog is not None or _disabled:
        return _watchdog
    config = process_config()
    address = store_address()
    if not (config.enabled and config.watchdog) or address is None:
        if config.enabled and config.watchdog:
            logger.warning("vllm-elastic-ft: no watchdog store address in this process; "
                           "dispatch/combine run without a watchdog")
        _disabled = True
        return None
    from vllm_elastic_ft.comm.store import connect_store
    from vllm_elastic_ft.faults.injection import injection_for

    store = connect_store(address)
    _watchdog = RankWatchdog(
        WatchdogSettings.from_config(config), store, GROUP_NAME, rank, world_size,
        injection=injection_for(config, store, GROUP_NAME, rank),
    )
    atexit.register(_watchdog.shutdown)
    if _serving:
        _watchdog.end_warmup()
    return _watchdog


def serving_started() -> None:
    """vLLM's start-up (profile run, warm-up dummy runs) is over: from now on every guarded
    call is a serving call and gets the steady deadline, not the warm-up grace. Called by
    ``patches/worker/worker_start.py``; a watchdog built later starts out of warm-up."""
    global _serving
    _serving = True
    if _watchdog is not None:
        _watchdog.end_warmup()


def current_watchdog() -> RankWatchdog | None:
    """The watchdog if it exists already (never builds one)."""
    return _watchdog
