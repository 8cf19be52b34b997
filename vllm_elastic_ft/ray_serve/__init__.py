"""The Ray Serve LLM adapter: DP gangs that heal in place (see README, "Ray Serve LLM")."""

from vllm_elastic_ft.ray_serve.builder import (
    build_elastic_dp_deployment, build_elastic_dp_openai_app, prepare_llm_config,
)

__all__ = ["build_elastic_dp_deployment", "build_elastic_dp_openai_app", "prepare_llm_config"]
