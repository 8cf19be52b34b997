"""DeepEP (GPU wide-EP) as a transport of the recovery core, and the tier each backend gets.

Where this sits in the failure path: the watchdog (``watchdog/deepep.py``)
puts a deadline around every DeepEP dispatch and combine and names the silent
rank; the recovery core (``group/member.py``) then asks the group's transport
what it can do (``comm/transport.py``, :class:`RecoveryTier`). For DeepEP the
honest answer today is GANG_RESTART: no in-engine rebuild of DeepEP buffers
has run on GPUs yet, so the core fences the group epoch, aborts this
transport (dropping the buffer, never destroying it) and reports FAILED; the
orchestrator restarts the gang.

:func:`recovery_tier_for_backend` says the same for every vLLM
``--all2all-backend`` value, as data, so a deployment can tell before a fault
whether a group will be rebuilt in place or restarted.

``deep_ep`` is never imported here: the transport only holds the buffer vLLM
already built (or its watched twin), so this module imports on any machine.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch

from vllm_elastic_ft.comm.transport import Cancelled, RecoveryTier

#: ``DeepEPTransport`` modes, each with the buffer methods it forwards to.
MODES: dict[str, tuple[str, str]] = {
    "high_throughput": ("dispatch", "combine"),
    "low_latency": ("low_latency_dispatch", "low_latency_combine"),
}

#: vLLM's CPU all2all backend: its collectives run on a gloo group rebuilt in place.
GLOO_BACKEND = "allgather_reducescatter"
#: vLLM's DeepEP all2all backends, each with its ``DeepEPTransport`` mode.
DEEPEP_BACKENDS: dict[str, str] = {
    "deepep_high_throughput": "high_throughput",
    "deepep_low_latency": "low_latency",
}


class DeepEPTransport:
    """The transport contract over an existing ``deep_ep.Buffer`` (one group, epoch 0 only).

    Recovery tier: GANG_RESTART in both modes. No in-engine rebuild of DeepEP
    buffers has run on GPUs yet, so on a fault the core fences the group and
    goes straight to FAILED (the orchestrator's gang restart). The high-
    throughput kernels trap on a timeout (a sticky CUDA error: the process
    must be restarted anyway). The low-latency kernels with ``enable_shrink``
    mask a silent rank instead; continuing with that mask would be the
    MASKED_CONTINUE tier, later, once it has run somewhere.

    Deadlines: DeepEP kernels cannot be cancelled from the host. The
    ``timeout`` of the contract is accepted and not enforced here: the
    watchdog's deadline around the call (``WatchedDeepEPBuffer``, which may be
    the ``buffer`` given here) is what bounds it. ``cancelled`` is checked
    before a launch: no kernel is started once a peer is named dead.

    Args:
        buffer: the ``deep_ep.Buffer`` vLLM built (or its ``WatchedDeepEPBuffer``).
        mode: ``"high_throughput"`` or ``"low_latency"``.
    """

    recovery_tier = RecoveryTier.GANG_RESTART

    def __init__(self, buffer: Any, mode: str = "high_throughput"):
        if mode not in MODES:
            raise ValueError(f"DeepEPTransport mode {mode!r} is not one of {sorted(MODES)}")
        self.mode = mode
        self.name = f"deepep_{mode}"
        self._buffer = buffer
        self.aborted = False

    @property
    def buffer(self) -> Any:
        """The buffer (None once aborted)."""
        return self._buffer

    # ------------------------------------------------------------ lifecycle
    def configure(self, epoch: int, rank: int, world_size: int) -> None:
        """Accept epoch 0 as the buffer vLLM built; refuse every other epoch.

        Raises:
            RuntimeError: ``epoch`` is not 0, the transport was aborted, or
                ``rank``/``world_size`` are not the buffer's own. A new buffer
                is never built here.
        """
        if epoch != 0:
            raise RuntimeError(
                f"transport {self.name} cannot configure epoch {epoch}: recovery tier "
                f"{self.recovery_tier.value}, no in-engine rebuild of DeepEP buffers (the "
                "orchestrator restarts the gang)")
        if self.aborted:
            raise RuntimeError(f"transport {self.name} was aborted: its buffer is gone")
        own = (int(self._buffer.rank), int(self._buffer.group_size))
        if (rank, world_size) != own:
            raise RuntimeError(
                f"transport {self.name}: epoch 0 is the buffer vLLM built (rank {own[0]} of "
                f"{own[1]}), not rank {rank} of {world_size}")

    def abort(self) -> None:
        """Mark the transport aborted and drop the buffer, without talking to any peer."""
        # Never buffer.destroy(): it barriers over all ranks, so with a dead peer it
        # never returns (and after an HT trap the CUDA context is unusable anyway).
        # The gang restart frees the buffer with the process.
        self.aborted = True
        self._buffer = None

    def shutdown(self) -> None:
        """Same as :meth:`abort` (never ``destroy()``: a peer may be dead)."""
        self.abort()

    # ---------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, timeout: timedelta | None = None,
                   cancelled: Cancelled | None = None) -> None:
        """Not a DeepEP operation.

        Raises:
            RuntimeError: the transport was aborted.
            NotImplementedError: always otherwise; on GPU the batch sync stays
                on vLLM's own DP group.
        """
        self._live_buffer(cancelled)
        raise NotImplementedError(
            f"transport {self.name} has no all_reduce: DeepEP only dispatches and combines; "
            "the batch sync stays on vLLM's own DP group")

    def dispatch(self, *args: Any, timeout: timedelta | None = None,
                 cancelled: Cancelled | None = None, **kwargs: Any) -> Any:
        """``buffer.dispatch`` (HT) or ``buffer.low_latency_dispatch`` (LL), arguments as is.

        Args:
            *args: forwarded to the buffer method unchanged.
            timeout: accepted for the contract; bounded by the watchdog's deadline.
            cancelled: checked before the launch.
            **kwargs: forwarded to the buffer method unchanged.

        Returns:
            The buffer's result (LL: without the receive hook, which has run).
        """
        return self._exchange(0, cancelled, args, kwargs)

    def combine(self, *args: Any, timeout: timedelta | None = None,
                cancelled: Cancelled | None = None, **kwargs: Any) -> Any:
        """``buffer.combine`` (HT) or ``buffer.low_latency_combine`` (LL); see :meth:`dispatch`."""
        return self._exchange(1, cancelled, args, kwargs)

    def silent_ranks(self) -> list[int]:
        """The ranks the low-latency shrink mask marks (1 = masked); [] in HT mode,
        without a mask API, or once aborted."""
        buffer = self._buffer
        if self.mode != "low_latency" or buffer is None or \
                not hasattr(buffer, "low_latency_query_mask_buffer"):
            return []
        return masked_ranks(buffer)

    # -------------------------------------------------------------- helpers
    def _live_buffer(self, cancelled: Cancelled | None) -> Any:
        if self.aborted or self._buffer is None:
            raise RuntimeError(f"transport {self.name} aborted")
        if cancelled is not None and cancelled():
            raise RuntimeError(f"transport {self.name}: cancelled, a peer is already named "
                               "dead (no kernel launched)")
        return self._buffer

    def _exchange(self, which: int, cancelled: Cancelled | None, args: tuple,
                  kwargs: dict) -> Any:
        method = getattr(self._live_buffer(cancelled), MODES[self.mode][which])
        result = method(*args, **kwargs)
        return result if self.mode == "high_throughput" else _wait_for_hook(result)


def _wait_for_hook(result: Any) -> Any:
    """Run the receive hook a low-latency call returned last; the rest of its result."""
    if not isinstance(result, tuple) or not result:
        return result
    hook: Callable[[], Any] | None = result[-1]
    if callable(hook):
        hook()
    return result[:-1]


def masked_ranks(buffer: Any) -> list[int]:
    """Ranks marked in ``buffer``'s low-latency mask (``enable_shrink``; 1 = masked)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # DeepEP's mask lives on GPU
    mask = torch.zeros(int(buffer.group_size), dtype=torch.int32, device=device)
    buffer.low_latency_query_mask_buffer(mask)
    return [int(r) for r in mask.nonzero().flatten().tolist()]


# ------------------------------------------------------------------ backends
def recovery_tier_for_backend(backend: str) -> tuple[RecoveryTier, str]:
    """The recovery tier a vLLM ``--all2all-backend`` value gets, and why.

    Pure: reads nothing but ``backend``.
    """
    if backend == GLOO_BACKEND:
        return (RecoveryTier.REBUILD_IN_PLACE,
                f"{backend} runs on a gloo group (GlooTransport), rebuilt in place over the "
                "survivors (run on CPU: tests/test_rebuild_integ.py and the e2e tests)")
    if backend in DEEPEP_BACKENDS:
        return (RecoveryTier.GANG_RESTART,
                f"{backend}: no in-engine rebuild of DeepEP buffers has run on GPUs yet; a fault "
                "fences the group and the orchestrator restarts the gang")
    return (RecoveryTier.GANG_RESTART,
            f"{backend}: no recovery tier is verified for this all2all backend; a fault fences "
            "the group and the orchestrator restarts the gang")


def transport_for_all2all_backend(backend: str, buffer: Any = None) -> DeepEPTransport | str:
    """The transport a vLLM ``--all2all-backend`` value gets.

    Returns:
        A :class:`DeepEPTransport` over ``buffer`` for a DeepEP backend when a
        buffer is given; otherwise the transport's name only: ``"gloo"`` for
        ``allgather_reducescatter`` (its ``GlooTransport`` needs the group's
        store, built by the group), the backend itself for a DeepEP backend
        without a buffer or for any other backend. Its tier:
        :func:`recovery_tier_for_backend`.
    """
    if backend == GLOO_BACKEND:
        return "gloo"
    if backend in DEEPEP_BACKENDS and buffer is not None:
        return DeepEPTransport(buffer, DEEPEP_BACKENDS[backend])
    return backend
