"""Build a CPU worker's elastic DP group when the worker has started, not at its first step.

The group (its watchdog's heartbeats, its epoch-0 communicator) used to come
up at the first DP collective, i.e. the first request: vLLM's CPU start-up
(profile run, warm-up) runs none. A rank that died between start-up and the
first request had then never published a heartbeat, and that first request
waited in the epoch-0 rendezvous for it, with no deadline (measured: DP=4,
worker of rank 1 SIGKILLed right after the server was ready, the next request
hung). Built at the end of start-up, every rank's heartbeat names such a death
at once and the idle survivors rebuild before the first request arrives.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.worker_group import attached_worker_group
from vllm_elastic_ft.vllm.worker_watchdog import serving_started

WARM_UP = PatchSpec(
    target="vllm.v1.worker.cpu_worker:CPUWorker.compile_or_warm_up_model",
    why="Nothing watches a DP rank before its first step: a rank that dies after start-up "
    "but before the first request stalls that request with no deadline.",
    how="After vLLM's warm-up, build the worker's elastic DP group (watchdog heartbeats, "
    "epoch-0 communicator) and attach the loaded model; end the watchdog's warm-up grace "
    "(every later guarded call is a serving call: the steady deadline).",
    upstream="vllm-project/vllm#30112 (keep survivors when a DP process dies)",
    remove_when="vLLM's DP ranks watch each other from start-up.",
    params=("self",),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (WARM_UP,)


def _make_compile_or_warm_up_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def compile_or_warm_up_model(self):
        result = original(self)
        attached_worker_group(self)  # None (nothing built) when in-engine rebuild is off
        serving_started()
        return result

    return compile_or_warm_up_model


def apply() -> None:
    apply_patch(WARM_UP, _make_compile_or_warm_up_model)
