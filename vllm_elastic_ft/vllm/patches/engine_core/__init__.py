"""Patches applied in an engine-core process (``EngineCore_DP<n>``)."""

from vllm_elastic_ft.vllm.patches.engine_core import engine_sync, no_cascade, replacement

MODULES = (engine_sync, no_cascade, replacement)
