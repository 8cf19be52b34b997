"""Patches applied in a worker process (``VllmWorker-<rank>``, where the model runs)."""

from vllm_elastic_ft.vllm.patches.worker import (
    cpu_communicator, cpu_experts, deepep, dp_sync, replacement, step_retry, worker_start,
)

MODULES = (cpu_communicator, cpu_experts, deepep, dp_sync, replacement, step_retry,
           worker_start)
