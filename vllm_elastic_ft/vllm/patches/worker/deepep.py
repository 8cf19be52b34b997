"""Put DeepEP's dispatch and combine (GPU wide-EP) under the rank watchdog.

vLLM 0.32 hands a ``deep_ep.Buffer`` to ``DeepEPHTPrepareAndFinalize`` (high
throughput: ``buffer.dispatch`` / ``buffer.combine``) and to
``DeepEPLLPrepareAndFinalize`` (low latency: ``buffer.low_latency_dispatch`` /
``low_latency_combine``), and both keep it as ``self.buffer``. Patching their
``__init__`` to wrap that attribute in :class:`WatchedDeepEPBuffer` puts every
call under a deadline without touching the call sites. Skipped where
``deep_ep`` is not installed (every CPU machine).
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.worker_watchdog import process_watchdog
from vllm_elastic_ft.watchdog.deepep import WatchedDeepEPBuffer

_PKG = "vllm.model_executor.layers.fused_moe.prepare_finalize"

HT_INIT = PatchSpec(
    target=f"{_PKG}.deepep_ht:DeepEPHTPrepareAndFinalize.__init__",
    why="DeepEP HT kernels spin ~100 s on a silent peer, then trap (sticky CUDA error); "
    "nothing on the host notices earlier.",
    how="After __init__, wrap self.buffer so dispatch/combine run inside a watchdog deadline.",
    upstream="vllm-project/vllm#30112, #46370 (survive a DP rank failure)",
    remove_when="vLLM's DeepEP prepare/finalize take a fault-detection hook.",
    params=("self", "buffer"),
    requires="deep_ep",
    vllm_versions=CHECKED_WITH_0_33,
)
LL_INIT = PatchSpec(
    target=f"{_PKG}.deepep_ll:DeepEPLLPrepareAndFinalize.__init__",
    why="DeepEP LL kernels wait ~100 s on a silent peer (or mask it with enable_shrink) "
    "without telling the host which rank failed.",
    how="After __init__, wrap self.buffer: deadline from launch to receive-hook "
    "completion; the mask buffer names the silent rank.",
    upstream="vllm-project/vllm#30112, #46370 (survive a DP rank failure)",
    remove_when="vLLM's DeepEP prepare/finalize take a fault-detection hook.",
    params=("self", "buffer"),
    requires="deep_ep",
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (HT_INIT, LL_INIT)


def wrap_buffer(owner: Any) -> None:
    """Replace ``owner.buffer`` by its watched twin (once; no-op without a watchdog)."""
    buffer = owner.buffer
    if isinstance(buffer, WatchedDeepEPBuffer):
        return
    watchdog = process_watchdog(buffer.rank, buffer.group_size)
    if watchdog is not None:
        owner.buffer = WatchedDeepEPBuffer(buffer, watchdog)


def _make_init(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        wrap_buffer(self)

    return __init__


def apply() -> None:
    apply_patch(HT_INIT, _make_init)
    apply_patch(LL_INIT, _make_init)
