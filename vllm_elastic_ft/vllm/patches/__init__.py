"""The plugin's vLLM patches, one module per patched vLLM area.

Each module defines ``SPECS`` (its registry entries, see ``patching.PatchSpec``)
and ``apply()``. ``FRONTEND`` patches take effect where engine arguments are
parsed (API server, Ray Serve replica); ``ENGINE`` patches where the model runs
(engine-core and worker processes). The plugin applies both everywhere: each is
idempotent and cheap, and a process simply never calls the other side's code.
"""

from vllm_elastic_ft.vllm.patches import (
    cpu_communicator, cpu_experts, deepep, dp_sync, engine_args, engine_sync, no_cascade,
    replacement, request_routing, step_retry, worker_start,
)

FRONTEND = (engine_args, no_cascade, request_routing)
ENGINE = (cpu_communicator, cpu_experts, deepep, dp_sync, step_retry, engine_sync, replacement,
          worker_start)
ALL = FRONTEND + ENGINE
