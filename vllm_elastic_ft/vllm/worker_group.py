"""The DP group as one vLLM worker sees it: epoch, members, communicator, experts.

With ``in_engine_rebuild`` on, every per-step DP collective of a worker — the
batch-size all-reduce (``_run_ar``), the MoE dispatch (``all_gatherv``) and
combine (``reduce_scatterv``) — runs on this module's epoch-scoped gloo group
instead of vLLM's DP group, under the rank watchdog. vLLM's own view never
changes: the DP size stays N and the DP rank stays the same ("a logical N with a
hole"). When ranks are lost, only the transport shrinks: the dead ranks'
columns of the batch all-reduce are 0, so they contribute no tokens, and the
collectives run over the live members.

On a fault (a RankFaultError from a collective, or the group epoch moving on),
:meth:`WorkerGroup.recover` fences the epoch, agrees on the survivors
(``group/epochs.py``), rebuilds the communicator, loads the orphaned experts
from the checkpoint (``expert_loader``) and moves the watchdog on. The vLLM
patches then redo the interrupted step on the new group (see
``patches/step_retry.py``): every survivor redoes "batch all-reduce, then
forward", whichever collective it was in, and the all-reduce carries each
rank's step number so a survivor that is a step apart is caught, not mixed in.

A replacement worker (``vllm/replacement.py``) starts *joining*: until it is
admitted its collectives are local (every other rank counts 0 tokens), which is
all its warm-up needs; :meth:`WorkerGroup.admit` then brings it in at the next
epoch together with the members (a planned fence, ``epochs.admit``).
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Sequence

import torch

from vllm_elastic_ft.comm.cpu_collectives import _finish
from vllm_elastic_ft.comm.elastic_group import ElasticProcessGroup, pg_timeout
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group import membership as ms
from vllm_elastic_ft.group.controller import GroupController
from vllm_elastic_ft.group.fencing import FencedError
from vllm_elastic_ft.group.state_machine import (
    GroupState, JoinRequested, PeerFenced, RebuildDone, RebuildFailed, RebuildStarted, Served,
)
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.process_config import in_engine_rebuild_on, process_config
from vllm_elastic_ft.vllm.watchdog_store import store_address
from vllm_elastic_ft.vllm.worker_watchdog import GROUP_NAME, process_watchdog
from vllm_elastic_ft.watchdog.guarded import guarded_combine, guarded_dispatch, run_guarded
from vllm_elastic_ft.watchdog.report import RankFaultError

logger = get_logger(__name__)


class GroupFailedError(RuntimeError):
    """The group cannot be rebuilt (budget, attempts, a step mismatch): it is FAILED."""


def serving_key(epoch: int) -> str:
    return f"eft/{GROUP_NAME}/e{epoch}/serving"


def pg_prefix(epoch: int) -> str:
    return f"eft/{GROUP_NAME}/e{epoch}/pg"


class WorkerGroup:
    """One worker's membership in its DP group (stable id = its DP rank)."""

    def __init__(self, rank_id: int, world: int, store, config, joining: bool = False):
        self.id = rank_id
        self.world = world
        self.store = store
        self.config = config
        self.watchdog = process_watchdog(rank_id, world)
        self.controller = GroupController(GROUP_NAME, world, config.controller_options(),
                                          rank=rank_id)
        self.pg = ElasticProcessGroup(store, pg_timeout(config.rebuild_budget_s))
        self.members = ms.Membership(0, tuple(range(world)), {}, -1)
        self.model = None
        self.checkpoint_dir: str | None = None
        self.num_experts = 0
        self.loaded_experts: list[int] = []
        self.step = 0  # batch all-reduces started (a retried one keeps its number)
        self._redo_step = False
        # A step runs from its batch all-reduce to the end of its forward. Between
        # steps (an idle engine) the watchdog's thread may run the rebuild itself:
        # nobody else would, since an idle rank never meets the failed collective.
        self._lock = threading.RLock()
        self._in_step = False
        self._idle_rebuild: threading.Thread | None = None
        self._fenced_out: BaseException | None = None
        self.last_column: list[int] | None = None
        # A replacement rank runs alone until the group admits it (see admit()).
        if joining:
            self.members = ms.Membership(-1, (rank_id,), {}, -1)
        else:
            self.pg.configure(pg_prefix(0), rank_id, world)
        self.watchdog.after_tick = self._maybe_rebuild_while_idle
        logger.info("elastic DP group: worker rank %d/%d %s", rank_id, world,
                    "joining (alone until admitted)" if joining
                    else "on its own epoch-0 communicator")

    @property
    def joining(self) -> bool:
        """A replacement rank not admitted yet (its membership has no epoch)."""
        return self.members.epoch < 0

    # ------------------------------------------------------------ model
    def attach_runner(self, runner) -> None:
        """Know the model a vLLM model runner loaded, and its checkpoint (see attach_model).
        Called at every step: after the first, a no-op."""
        if self.model is not None:
            return
        model_config = runner.vllm_config.model_config
        self.attach_model(runner.model, model_config.model, model_config.get_num_experts())

    def attach_model(self, model, checkpoint_dir: str, num_experts: int) -> None:
        """Know the model (to load orphaned experts into) and its checkpoint."""
        if self.model is not None:
            return
        self.model, self.checkpoint_dir, self.num_experts = model, checkpoint_dir, num_experts
        if self.joining:
            from vllm_elastic_ft.vllm.expert_loader import local_experts, moe_layers

            layers = moe_layers(model)
            held = tuple(local_experts(layers[0])) if layers else ()
            self.members = ms.Membership(-1, (self.id,), {self.id: held}, -1)
            return
        if num_experts and not self.members.placement:
            self.members = epochs.initial(self.world, num_experts)
            self.store.set(epochs.num_experts_key(GROUP_NAME), str(num_experts))
            from vllm_elastic_ft.vllm.expert_loader import local_experts, moe_layers

            layers = moe_layers(model)
            if layers and tuple(local_experts(layers[0])) != self.members.placement[self.id]:
                logger.warning("rank %d holds experts %s, not the contiguous layout %s the "
                               "placement solver assumes", self.id, local_experts(layers[0]),
                               self.members.placement[self.id])

    # ---------------------------------------------------------- collectives
    @property
    def live(self) -> tuple[int, ...]:
        return self.members.members

    def _group_rank(self) -> int:
        return self.members.group_rank(self.id)

    def follow(self) -> None:
        """Catch up with an epoch a peer (or the engine) already moved to."""
        if self._fenced_out is not None:
            raise self._fenced_out
        if self.watchdog.group_epoch > self.members.epoch:
            self.recover("the group moved to epoch %d" % self.watchdog.group_epoch)

    def all_reduce_batch(self, column: Sequence[int], retry: bool = False) -> torch.Tensor:
        """The DP batch all-reduce: ``[len(column), N]`` with this rank's column, 0 for dead ranks.

        ``retry``: redo the last step's all-reduce (after a rebuild) instead of a new step.
        """
        with self._lock:  # waits for a rebuild the watchdog's thread started while idle
            self._in_step = True
        if not retry:
            if self._redo_step:  # a step re-run from the top after a rebuild
                self._redo_step = False
            else:
                self.step += 1
            self.last_column = list(column)
        rows = len(self.last_column)
        if self.joining:  # alone: the other ranks count 0 tokens
            out = torch.zeros(rows, self.world, dtype=torch.int32)
            out[:, self.id] = torch.tensor(self.last_column, dtype=torch.int32)
            return out
        for _ in range(self.config.max_rebuilds + 1):
            self.follow()
            members = self.live
            me = self._group_rank()
            tensor = torch.zeros(rows + 1, len(members), dtype=torch.int64)
            tensor[:rows, me] = torch.tensor(self.last_column, dtype=torch.int64)
            tensor[rows, me] = self.step
            try:
                run_guarded(self.watchdog, "dp_sync", lambda seq: _finish(
                    self.pg.pg.allreduce([tensor]), self.watchdog.wait_timeout(seq),
                    self.watchdog.peer_failed), inject_delay=False)
            except (RankFaultError, FencedError) as err:
                self.recover(f"batch all-reduce: {err}")
                continue
            steps = tensor[rows]
            if not bool((steps == self.step).all()):
                self._fail(f"ranks {list(members)} are at different steps {steps.tolist()} "
                           "after a rebuild: the interrupted step cannot be redone")
            self._served()
            out = torch.zeros(rows, self.world, dtype=torch.int32)
            out[:, list(members)] = tensor[:rows].to(torch.int32)
            return out
        self._fail("too many rebuilds in one step")

    def all_gatherv(self, tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
        """MoE dispatch over the live members; dead ranks' slots come back as zero rows."""
        if self.joining:
            return [_insert_dead_rows(t, sizes, (self.id,)) for t in tensors]
        self.follow()
        members = self.live
        gathered = guarded_dispatch(self.watchdog, list(tensors), [sizes[r] for r in members],
                                    self.pg.pg)
        if len(members) == self.world or not any(sizes[r] for r in range(self.world)
                                                  if r not in members):
            return gathered
        return [_insert_dead_rows(t, sizes, members) for t in gathered]

    def reduce_scatterv(self, tensor: torch.Tensor, sizes: Sequence[int], mode: str) -> torch.Tensor:
        """MoE combine over the live members (dead ranks' rows are dropped)."""
        if self.joining:
            start = sum(sizes[:self.id])
            return tensor[start:start + sizes[self.id]]
        self.follow()
        members = self.live
        if len(members) < self.world:
            starts = [sum(sizes[:r]) for r in range(self.world)]
            tensor = torch.cat([tensor[starts[r]:starts[r] + sizes[r]] for r in members])
        return guarded_combine(self.watchdog, tensor, [sizes[r] for r in members], self.pg.pg,
                               mode)

    # -------------------------------------------------------------- rebuild
    def recover(self, cause: str) -> None:
        """Move to the next epoch's group (see the module doc). Raises FencedError when this
        rank is no longer a member, GroupFailedError when the group cannot be rebuilt."""
        if not self.config.in_engine_rebuild:
            raise GroupFailedError(f"in-engine rebuild is off: {cause}")
        started = time.monotonic()
        old = self.members
        if not old.placement:
            self._fail(f"{cause}: the placement is unknown (no model attached)")
        suspects = epochs.reported_suspects(lambda: self.watchdog.sink.reports, old,
                                            lambda: self.watchdog.group_epoch > old.epoch, 1.0)
        report = next((r for r in self.watchdog.sink.reports if r.epoch == old.epoch), None)
        if report is not None:
            self.controller.fault({"epoch": report.epoch, "suspects": sorted(suspects),
                                   "kind": report.kind.value, "reporter": self.id})
        logger.warning("rank %d: recovering from epoch %d (%s); suspects %s", self.id, old.epoch,
                       cause[:300], sorted(suspects))
        from vllm_elastic_ft.faults import rebuild_delay_s

        held = rebuild_delay_s(self.store, GROUP_NAME)
        if held:  # fault injection: a slow rebuild, for a second fault to land in
            logger.warning("rank %d: rebuild held %.2fs (injected)", self.id, held)
            time.sleep(held)
        try:
            new = epochs.advance(self.store, GROUP_NAME, old, self.id, suspects, self.num_experts,
                                 self.config.join_window_s, self.config.rebuild_budget_s)
        except TimeoutError as err:
            self.controller.handle(RebuildFailed(old.epoch + 1, str(err)))
            self._fail(str(err))
        self.controller.handle(PeerFenced(new.epoch, tuple(sorted(suspects))))
        self.controller.handle(RebuildStarted(new.epoch))
        if self.controller.view.state is GroupState.FAILED:
            self._fail(self.controller.view.reason)
        me = new.group_rank(self.id)
        # Watchdog first: if a member dies before the communicator is up, its
        # heartbeat at the new epoch is what names it.
        self.watchdog.reconfigure(new.epoch, me, len(new.members))
        self._load_orphans(old, new)
        try:
            self.pg.configure(pg_prefix(new.epoch), me, len(new.members))
        except RuntimeError as err:  # a member vanished between agreement and connect
            self.members = new
            raise RankFaultError(f"epoch {new.epoch} communicator: {err}", op="configure",
                                 seq=-1, peer_closed=True) from err
        self.members = new
        self.controller.handle(RebuildDone(new.epoch, new.members))
        logger.warning("rank %d: rebuilt at epoch %d with members %s in %.3fs (holds experts %s)",
                       self.id, new.epoch, list(new.members), time.monotonic() - started,
                       list(new.placement[self.id]))

    def admit(self, joiner: int, ticket: str) -> ms.Membership:
        """Bring ``joiner`` (a replacement rank) into the group at the next epoch.

        Called on every member and on the joiner at once, while the engines are
        paused between steps (the front end orchestrates it). The joiner keeps
        the experts it loaded; members stop computing those experts; the
        joiner takes the members' step number so the step check stays exact.
        """
        with self._lock:
            started = time.monotonic()
            old = None if self.joining else self.members
            held = self.members.placement.get(self.id, ())
            new = epochs.admit(self.store, GROUP_NAME, old, self.id, joiner, ticket,
                               held if old is None else None, self.step,
                               self.config.join_window_s, self.config.rebuild_budget_s)
            if old is not None:
                self.controller.handle(JoinRequested(joiner))
            self.controller.handle(PeerFenced(new.epoch))
            self.controller.handle(RebuildStarted(new.epoch))
            me = new.group_rank(self.id)
            self.watchdog.reconfigure(new.epoch, me, len(new.members))
            if old is not None:
                dropped = [e for e in old.placement.get(self.id, ())
                           if e not in new.placement.get(self.id, ())]
                if dropped and self.model is not None:
                    from vllm_elastic_ft.vllm.expert_loader import unmap_experts

                    unmap_experts(self.model, dropped)
            else:
                peer = next(r for r in new.members if r != self.id)
                self.step = int(self.store.get(epochs.step_key(GROUP_NAME, new.epoch, peer)))
            self.pg.configure(pg_prefix(new.epoch), me, len(new.members))
            self.members = new
            self.controller.handle(RebuildDone(new.epoch, new.members))
            logger.warning("rank %d: %s rank %d at epoch %d, members %s, in %.3fs (computes "
                           "experts %s)", self.id, "joined as" if old is None else "admitted",
                           joiner, new.epoch, list(new.members), time.monotonic() - started,
                           list(new.placement[self.id]))
            return new

    def step_done(self) -> None:
        """The step's forward returned (or failed for good): the rank is idle again."""
        with self._lock:
            self._in_step = False

    def _maybe_rebuild_while_idle(self) -> None:
        """Watcher thread, after each tick: an idle rank whose peer failed (or whose group
        moved on) rebuilds now, so the group is ready before the next request comes."""
        if (self.model is None or self.joining or not self.watchdog.peer_failed()
                or self._fenced_out is not None or self._admission_coming()):
            return
        if self._idle_rebuild is not None and self._idle_rebuild.is_alive():
            return
        with self._lock:
            if self._in_step:
                return  # the step meets the fault itself and recovers in place
        self._idle_rebuild = threading.Thread(target=self._rebuild_while_idle,
                                              name="elastic-ft-idle-rebuild", daemon=True)
        self._idle_rebuild.start()

    def _admission_coming(self) -> bool:
        """The group moved one epoch on for an admission and no peer was named: this rank's
        own admit call is on its way (recovering on its own here would fence once more
        and leave the engines' DP sync at two different epochs)."""
        epoch = self.watchdog.group_epoch
        return (not self.watchdog.peer_named() and epoch == self.members.epoch + 1
                and epochs.is_admission(self.store, GROUP_NAME, epoch))

    def _rebuild_while_idle(self) -> None:
        with self._lock:
            if self._in_step or not self.watchdog.peer_failed() or self._admission_coming():
                return
            try:
                self.recover("a peer failed while this rank was idle")
            except FencedError as err:
                self._fenced_out = err  # the next step raises it: this rank must leave
            except Exception:
                logger.exception("rank %d: rebuild while idle failed; the next step retries",
                                 self.id)

    def redo_step_from_top(self) -> None:
        """The interrupted step is re-run from its beginning: its next batch all-reduce
        keeps the step's number (peers that retry only the forward do the same)."""
        self._redo_step = True

    def _load_orphans(self, old: ms.Membership, new: ms.Membership) -> None:
        mine = [e for e in new.placement[self.id] if e not in old.placement.get(self.id, ())]
        if not mine:
            return
        from vllm_elastic_ft.vllm.expert_loader import load_orphans

        load_orphans(self.model, mine, self.checkpoint_dir)
        self.loaded_experts += mine

    def _served(self) -> None:
        if self.controller.view.state is GroupState.READY:
            self.controller.handle(Served(self.members.epoch))
            # The front end's follower turns READY into HEALTHY on this mark: the
            # first step of the new epoch went through on every member.
            self.store.set(serving_key(self.members.epoch), str(self.id))

    def _fail(self, reason: str):
        logger.error("rank %d: group cannot be rebuilt: %s", self.id, reason)
        raise GroupFailedError(reason)


def _insert_dead_rows(gathered: torch.Tensor, sizes: Sequence[int], members) -> torch.Tensor:
    """Put ``sizes[d]`` zero rows at each dead rank ``d``'s place (logical rank order)."""
    live_parts = iter(torch.split(gathered, [sizes[r] for r in members]))
    parts = []
    for r in range(len(sizes)):
        if r in members:
            parts.append(next(live_parts))
        else:
            parts.append(gathered.new_zeros((sizes[r],) + tuple(gathered.shape[1:])))
    return torch.cat(parts)


_group: WorkerGroup | None = None
_off = False


def worker_group(rank_id: int, world: int) -> WorkerGroup | None:
    """This worker's group (built at the first DP collective), or None when rebuild is off."""
    global _group, _off
    if _group is not None or _off:
        return _group
    if not in_engine_rebuild_on(world) or process_watchdog(rank_id, world) is None:
        _off = True
        return None
    from vllm_elastic_ft.faults import connect_store

    from vllm_elastic_ft.vllm.replacement import replaced_rank

    _group = WorkerGroup(rank_id, world, connect_store(store_address()), process_config(),
                         joining=replaced_rank() == rank_id)
    atexit.register(_group.pg.shutdown)
    _die_with_parent()
    return _group


def attached_worker_group(worker) -> WorkerGroup | None:
    """A vLLM worker's group (built now if it is not yet) with the worker's model attached,
    or None when in-engine rebuild is off in this process."""
    parallel_config = worker.vllm_config.parallel_config
    group = worker_group(parallel_config.data_parallel_rank, parallel_config.data_parallel_size)
    if group is not None:
        group.attach_runner(worker.model_runner)
    return group


def _die_with_parent() -> None:
    """Make the kernel SIGKILL this worker when its engine core dies.

    Otherwise a worker whose engine was killed lingers (vLLM notices the dead
    parent and shuts down gracefully, seconds later), and the peers learn of the
    loss only at their watchdog deadline; a closed socket tells them in
    milliseconds. Linux only (prctl PR_SET_PDEATHSIG); a no-op elsewhere.
    """
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the engine died before the call took effect
        os.kill(os.getpid(), signal.SIGKILL)


def current_group() -> WorkerGroup | None:
    return _group
