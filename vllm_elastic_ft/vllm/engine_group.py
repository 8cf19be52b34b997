"""The DP group as one vLLM engine core sees it: the engines' own "any work left?" sync.

Every ``dp_sync_interval`` steps the DP engine cores all-reduce
``[has_unfinished, pending_pause]`` (``ParallelConfig.sync_dp_state``, vLLM
0.32.0) on a gloo group whose store lives in DP rank 0's engine. With
``in_engine_rebuild`` on, that sync runs here instead, on an epoch-scoped gloo
group in the plugin's store, with a bounded wait, and it follows the workers'
group: engines never decide membership themselves (an engine whose worker is
dead must not register), they adopt what the workers agreed
(``epochs.published``).

* A sync that fails (a peer engine died) answers "work remains": the engine then
  runs one more (dummy) step, in which its worker meets the fault and rebuilds
  the group; the next sync runs on the engines of the new epoch.
* A sync that waits while the workers' epoch moves on gives up at once.
* An engine that is not a member of the new epoch raises FencedError and exits
  (the front end has already taken it out of routing).
* If DP rank 0 was lost, the lowest surviving engine takes over rank 0's one
  duty in the busy loop (telling the coordinator a wave is complete), and hands
  it back when a replacement rank 0 is admitted.
* A replacement engine (``vllm/replacement.py``) syncs with itself alone until
  it is admitted (:meth:`EngineGroup.admitted`).
"""

from __future__ import annotations

from datetime import timedelta

import torch

from vllm_elastic_ft.comm.elastic_group import pg_timeout, rebuilt_pg_timeout
from vllm_elastic_ft.comm.transport import GlooTransport
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group.fencing import FencedError, current_epoch
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.worker_watchdog import GROUP_NAME

logger = get_logger(__name__)

ENGINE_GROUP = "engine"


class EngineGroup:
    def __init__(self, rank_id: int, world: int, store, config, joining: bool = False):
        self.id = rank_id
        self.world = world
        self.store = store
        self.config = config
        self.engine = None
        self.epoch = 0
        self.members: tuple[int, ...] = tuple(range(world))
        self.transport = GlooTransport(store, ENGINE_GROUP, pg_timeout(config.rebuild_budget_s),
                                       rebuilt_timeout=rebuilt_pg_timeout(config.rebuild_budget_s))
        if joining:  # no epoch until admitted (see admitted())
            self.epoch, self.members = -1, ()
        else:
            self.transport.configure(0, rank_id, world)

    @property
    def joining(self) -> bool:
        """A replacement engine not admitted yet."""
        return self.epoch < 0

    def bind(self, engine) -> None:
        self.engine = engine

    def _workers_epoch(self) -> int:
        return current_epoch(self.store, GROUP_NAME)

    def follow(self) -> None:
        """Adopt the workers' latest agreed membership, if it is newer than ours."""
        epoch = self._workers_epoch()
        if epoch <= self.epoch:
            return
        membership = epochs.await_published(self.store, GROUP_NAME, epoch,
                                            self.config.rebuild_budget_s)
        if self.id not in membership.members:
            raise FencedError(ENGINE_GROUP, self.id, self.epoch, epoch)
        rank = membership.members.index(self.id)
        self.transport.configure(epoch, rank, len(membership.members))
        self.epoch, self.members = epoch, membership.members
        if self.engine is not None:
            # vLLM's busy loop lets only dp_rank 0 report "wave complete" to the
            # coordinator; someone must, or the coordinator thinks we never idle.
            acting_zero = 0 not in self.members and self.id == min(self.members)
            self.engine.dp_rank = 0 if acting_zero else self.id
        logger.warning("engine %d: DP sync now over engines %s (epoch %d)", self.id,
                       list(self.members), epoch)

    def admitted(self) -> None:
        """This engine's worker was just admitted (or admitted a joiner): sync with the new
        epoch's engines from now on (every engine of it calls this at the same time)."""
        self.follow()

    def sync_state(self, has_unfinished: bool, pending_pause: bool) -> tuple[bool, bool]:
        """``(any engine has work, every engine wants to pause)`` over the live engines."""
        if self.joining:  # not admitted yet: alone
            return has_unfinished, pending_pause
        self.follow()
        tensor = torch.tensor([int(has_unfinished), int(pending_pause)], dtype=torch.int32)
        epoch = self.epoch
        try:
            self.transport.all_reduce(tensor, timedelta(seconds=self.config.rebuild_budget_s),
                                      lambda: self._workers_epoch() > epoch)
        except RuntimeError as err:
            # A peer engine is gone (or the workers already moved on). Say "work
            # remains": the next (dummy) step makes this engine's worker meet the
            # fault and rebuild; the next sync runs on the new epoch's engines.
            logger.warning("engine %d: DP sync at epoch %d failed (%s); running one more step",
                           self.id, epoch, str(err)[:200])
            return True, False
        size = len(self.members)
        pauses = int(tensor[1])
        return bool(tensor[0] > 0) or pauses % size != 0, pauses == size


_group: EngineGroup | None = None
_off = False


def current_engine_group() -> EngineGroup | None:
    return _group


def engine_group(rank_id: int, world: int) -> EngineGroup | None:
    global _group, _off
    if _group is not None or _off:
        return _group
    from vllm_elastic_ft.vllm.process_config import in_engine_rebuild_on, process_config
    from vllm_elastic_ft.vllm.watchdog_store import store_address

    if not in_engine_rebuild_on(world):
        _off = True
        return None
    from vllm_elastic_ft.comm.store import connect_store
    from vllm_elastic_ft.vllm.replacement import replaced_rank

    _group = EngineGroup(rank_id, world, connect_store(store_address()), process_config(),
                         joining=replaced_rank() == rank_id)
    return _group
