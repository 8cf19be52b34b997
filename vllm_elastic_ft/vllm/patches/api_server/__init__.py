"""Patches applied in the API server (front end: ``vllm serve``, a Ray Serve replica)."""

from vllm_elastic_ft.vllm.patches.api_server import engine_args, no_cascade, request_routing

MODULES = (engine_args, no_cascade, request_routing)
