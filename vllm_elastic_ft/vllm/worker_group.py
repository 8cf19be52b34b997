"""The DP group as one vLLM worker sees it: vLLM glue around the recovery core.

With ``in_engine_rebuild`` on, every per-step DP collective of a worker — the
batch-size all-reduce (``_run_ar``), the MoE dispatch (``all_gatherv``) and
combine (``reduce_scatterv``) — runs on the group's epoch-scoped transport
(``comm/transport.py``) under the rank watchdog. vLLM's own view never
changes: the DP size stays N and the DP rank stays the same ("a logical N with
a hole"). When ranks are lost, only the transport shrinks: the dead ranks'
columns of the batch all-reduce are 0, so they contribute no tokens, and the
collectives run over the live members.

Everything about a fault — recover, follow, idle rebuild, admission, retries
and budgets — is the recovery core's (``group/member.py``), the same object
the harness runs. This module only translates: vLLM's batch layout and step
numbers, dead rows in dispatch/combine, the model's experts
(``expert_loader``) as the core's ``ExpertHolder``, and which transport a
vLLM worker gets (gloo on CPU; DeepEP's tier on GPU is a gang restart).

A replacement worker (``vllm/replacement.py``) starts *joining*: until it is
admitted its collectives are local (every other rank counts 0 tokens), which is
all its warm-up needs; :meth:`GroupMember.admit` then brings it in.
"""

from __future__ import annotations

import atexit
from typing import Sequence

import torch

from vllm_elastic_ft.comm.elastic_group import pg_timeout, rebuilt_pg_timeout
from vllm_elastic_ft.comm.store import connect_store
from vllm_elastic_ft.comm.deepep_transport import recovery_tier_for_backend
from vllm_elastic_ft.comm.transport import GlooTransport, RecoveryTier
from vllm_elastic_ft.faults.injection import injection_for
from vllm_elastic_ft.group.member import GroupFailedError, GroupMember, MemberOptions
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.process_config import in_engine_rebuild_on, process_config
from vllm_elastic_ft.vllm.watchdog_store import store_address
from vllm_elastic_ft.vllm.worker_watchdog import GROUP_NAME, process_watchdog
from vllm_elastic_ft.watchdog.guarded import guarded_all_reduce, guarded_combine, guarded_dispatch

logger = get_logger(__name__)

#: vLLM's all2all backend on CPU (the only one there): its group rebuilds in place.
CPU_ALL2ALL_BACKEND = "allgather_reducescatter"

__all__ = ["GroupFailedError", "VllmExperts", "WorkerGroup", "attached_worker_group",
           "current_group", "worker_group"]


class VllmExperts:
    """A vLLM model's experts as the recovery core's ``ExpertHolder``."""

    def __init__(self, model, checkpoint_dir: str):
        self.model = model
        self.checkpoint_dir = checkpoint_dir

    def held(self) -> tuple[int, ...]:
        from vllm_elastic_ft.vllm.expert_loader import local_experts, moe_layers

        layers = moe_layers(self.model)
        return tuple(local_experts(layers[0])) if layers else ()

    def adopt(self, old: tuple[int, ...], new: tuple[int, ...]) -> list[int]:
        from vllm_elastic_ft.vllm.expert_loader import load_orphans, unmap_experts

        dropped = [e for e in old if e not in new]
        loaded = [e for e in new if e not in old]
        unmap_experts(self.model, dropped)  # an admitted joiner computes them again
        load_orphans(self.model, loaded, self.checkpoint_dir)
        return loaded


class WorkerGroup:
    """One vLLM worker's membership in its DP group (stable id = its DP rank)."""

    def __init__(self, rank_id: int, world: int, store, config, joining: bool = False,
                 all2all_backend: str = CPU_ALL2ALL_BACKEND):
        self.id = rank_id
        self.world = world
        self.config = config
        watchdog = process_watchdog(rank_id, world)
        transport = GlooTransport(store, GROUP_NAME, pg_timeout(config.rebuild_budget_s),
                                  config.cpu_dispatch,
                                  rebuilt_pg_timeout(config.rebuild_budget_s))
        tier, why = recovery_tier_for_backend(_backend_on_this_platform(all2all_backend))
        if tier is not RecoveryTier.REBUILD_IN_PLACE:
            # The batch sync runs on gloo, but dispatch/combine run on the GPU backend's
            # own buffers (DeepEP), which no in-engine rebuild has been run for: a fault
            # fences the group and goes straight to FAILED (the orchestrator's restart).
            transport.name, transport.recovery_tier = all2all_backend, tier
            logger.warning("rank %d: all2all backend %s: %s", rank_id, all2all_backend, why)
        self.member = GroupMember(rank_id, world, store, watchdog, transport,
                                  MemberOptions.from_config(config), GROUP_NAME,
                                  injection_for(config, store, GROUP_NAME, rank_id), joining)
        self.watchdog = watchdog
        self.transport = transport
        self.model = None
        self._redo_step = False
        self.last_column: list[int] | None = None
        logger.info("elastic DP group: worker rank %d/%d %s", rank_id, world,
                    "joining (alone until admitted)" if joining
                    else "on its own epoch-0 communicator")

    @property
    def joining(self) -> bool:
        return self.member.joining

    @property
    def live(self) -> tuple[int, ...]:
        return self.member.live

    # ------------------------------------------------------------ model
    def attach_runner(self, runner) -> None:
        """Know the model a vLLM model runner loaded, and its checkpoint. Called at every
        step: after the first, a no-op."""
        if self.model is not None:
            return
        model_config = runner.vllm_config.model_config
        self.attach_model(runner.model, model_config.model, model_config.get_num_experts())

    def attach_model(self, model, checkpoint_dir: str, num_experts: int) -> None:
        if self.model is not None:
            return
        self.model = model
        self.member.attach_experts(VllmExperts(model, checkpoint_dir), num_experts)

    # ---------------------------------------------------------- collectives
    def all_reduce_batch(self, column: Sequence[int], retry: bool = False) -> torch.Tensor:
        """The DP batch all-reduce: ``[len(column), N]`` with this rank's column, 0 for dead ranks.

        ``retry``: redo the last step's all-reduce (after a rebuild) instead of a new step.

        Each rank's step number rides along. Survivors can come out of a rebuild one step
        apart: a rank whose collectives of step ``n`` all completed before the fault reached
        it is at ``n + 1`` while a peer still redoes ``n``. That is safe: every rank's column
        is the size of the forward it runs next, and every retry is one all-reduce and one
        forward on every member, so the collectives still pair up. The laggard takes the
        highest number. A gap of more than one step cannot come from one fault (a rank
        cannot begin step ``n + 2`` before every member finished ``n``): FAILED, never mixed.
        """
        member = self.member
        if not retry:
            if self._redo_step:  # a step re-run from the top after a rebuild
                self._redo_step = False
            else:
                member.step += 1
            self.last_column = list(column)
        rows = len(self.last_column)
        if member.joining:  # alone: the other ranks count 0 tokens
            out = torch.zeros(rows, self.world, dtype=torch.int32)
            out[:, self.id] = torch.tensor(self.last_column, dtype=torch.int32)
            return out

        def attempt(_retry: bool) -> torch.Tensor:
            members = member.live
            tensor = torch.zeros(rows + 1, len(members), dtype=torch.int64)
            tensor[:rows, member.group_rank()] = torch.tensor(self.last_column, dtype=torch.int64)
            tensor[rows, member.group_rank()] = member.step
            guarded_all_reduce(self.watchdog, self.transport, tensor)
            steps = tensor[rows]
            ahead = int(steps.max())
            if ahead - int(steps.min()) > 1:
                member.fail(f"ranks {list(members)} are at steps {steps.tolist()} after a "
                            "rebuild: more than one step apart, which no single fault explains")
            if ahead != member.step:
                logger.info("rank %d: redid step %d while a peer had finished it; counting "
                            "on from step %d", self.id, member.step, ahead)
                member.step = ahead
            out = torch.zeros(rows, self.world, dtype=torch.int32)
            out[:, list(members)] = tensor[:rows].to(torch.int32)
            return out

        out = member.run_step(attempt)
        member.served()
        return out

    def all_gatherv(self, tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
        """MoE dispatch over the live members; dead ranks' slots come back as zero rows."""
        if self.joining:
            return [_insert_dead_rows(t, sizes, (self.id,)) for t in tensors]
        self.member.follow()
        members = self.live
        gathered = guarded_dispatch(self.watchdog, self.transport, list(tensors),
                                    [sizes[r] for r in members])
        if len(members) == self.world or not any(sizes[r] for r in range(self.world)
                                                  if r not in members):
            return gathered
        return [_insert_dead_rows(t, sizes, members) for t in gathered]

    def reduce_scatterv(self, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """MoE combine over the live members (dead ranks' rows are dropped)."""
        if self.joining:
            start = sum(sizes[:self.id])
            return tensor[start:start + sizes[self.id]]
        self.member.follow()
        members = self.live
        if len(members) < self.world:
            starts = [sum(sizes[:r]) for r in range(self.world)]
            tensor = torch.cat([tensor[starts[r]:starts[r] + sizes[r]] for r in members])
        return guarded_combine(self.watchdog, self.transport, tensor, [sizes[r] for r in members])

    # ----------------------------------------------------------- steps
    def run_forward(self, forward, redo_batch_sync):
        """Run a model forward; after a rank fault the core rebuilds the group, then
        ``redo_batch_sync()`` redoes the step's batch all-reduce and the forward runs again."""
        def attempt(retry: bool):
            if retry:
                redo_batch_sync(self.all_reduce_batch((), retry=True))
            return forward()

        return self.member.run_step(attempt)

    def run_dummy_step(self, dummy):
        """Run a dummy step; after a rank fault, rebuild and run the whole step again (its
        batch all-reduce keeps the interrupted step's number)."""
        def attempt(retry: bool):
            if retry:
                self._redo_step = True
            return dummy()

        return self.member.run_step(attempt)

    def admit(self, joiner: int, ticket: str):
        return self.member.admit(joiner, ticket)


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


def worker_group(rank_id: int, world: int,
                 all2all_backend: str = CPU_ALL2ALL_BACKEND) -> WorkerGroup | None:
    """This worker's group (built at the first DP collective), or None when rebuild is off.

    ``all2all_backend``: vLLM's ``ParallelConfig.all2all_backend`` (decides the recovery
    tier; the CPU backend rebuilds in place)."""
    global _group, _off
    if _group is not None or _off:
        return _group
    if not in_engine_rebuild_on(world) or process_watchdog(rank_id, world) is None:
        _off = True
        return None
    from vllm_elastic_ft.vllm.replacement import replaced_rank

    _group = WorkerGroup(rank_id, world, connect_store(store_address()), process_config(),
                         joining=replaced_rank() == rank_id, all2all_backend=all2all_backend)
    atexit.register(_group.member.shutdown)
    _die_with_parent()
    return _group


def _backend_on_this_platform(all2all_backend: str) -> str:
    """The backend as the tier table names it: the CPU one only on CPU (on a GPU the same
    name runs on NCCL, which no in-place rebuild has been run for)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return all2all_backend
    return f"{all2all_backend} on {current_platform.device_type}"


def attached_worker_group(worker) -> WorkerGroup | None:
    """A vLLM worker's group (built now if it is not yet) with the worker's model attached,
    or None when in-engine rebuild is off in this process."""
    parallel_config = worker.vllm_config.parallel_config
    group = worker_group(parallel_config.data_parallel_rank, parallel_config.data_parallel_size,
                         parallel_config.all2all_backend)
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
