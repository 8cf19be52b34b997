"""Builders with the shape of Ray Serve LLM's ``build_dp_deployment`` / ``build_dp_openai_app``.

``build_elastic_dp_deployment(llm_config)`` is ``ray.serve.llm.build_dp_deployment``
with the plugin switched on: it checks ``engine_kwargs["additional_config"]
["elastic_ft"]`` (the same ``ElasticFTConfig`` as ``vllm serve``; a bad key, or
a ``min_live_ranks`` above ``engine_kwargs["data_parallel_size"]``, fails here,
before any replica starts), adds ``VLLM_PLUGINS=elastic_ft`` to the
replicas' ``runtime_env``, routes with :class:`.router.GangAwareRequestRouter`
(routing stats every ``routing_stats_period_s``), and uses
:class:`.server.ElasticDPServer` as the deployment class. Gang scheduling,
``num_replicas`` (in DP groups) and autoscaling (in DP groups) are Ray's own,
untouched. Targets ray 2.60.
"""

from __future__ import annotations

import copy
from typing import Optional

from vllm_elastic_ft.config import CONFIG_KEY, ElasticFTConfig

ROUTER_CLASS = "vllm_elastic_ft.ray_serve.router:GangAwareRequestRouter"


def prepare_llm_config(llm_config, routing_stats_period_s: float = 0.5):
    """A copy of ``llm_config`` with the plugin on (validated config, plugin env, router)."""
    config = copy.deepcopy(llm_config)
    additional = dict(config.engine_kwargs.get("additional_config") or {})
    ft = ElasticFTConfig.from_additional_config(additional)  # raises, naming the bad key
    # The gang size is known here and nowhere in the config: a min_live_ranks above it
    # is refused now, not at the gang's first fault.
    ft.check_for_world(config.engine_kwargs.get("data_parallel_size", 1))
    if not ft.enabled:
        return config
    additional[CONFIG_KEY] = ft.to_dict()
    config.engine_kwargs["additional_config"] = additional
    runtime_env = dict(config.runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    plugins = [p for p in env_vars.get("VLLM_PLUGINS", "").split(",") if p]
    env_vars["VLLM_PLUGINS"] = ",".join(plugins + ["elastic_ft"] * ("elastic_ft" not in plugins))
    runtime_env["env_vars"] = env_vars
    config.runtime_env = runtime_env
    deployment = dict(config.deployment_config or {})
    deployment.setdefault("request_router_config", {
        "request_router_class": ROUTER_CLASS,
        "request_routing_stats_period_s": routing_stats_period_s,
        "request_routing_stats_timeout_s": max(5.0, 4 * routing_stats_period_s),
    })
    config.deployment_config = deployment
    return config


def build_elastic_dp_deployment(llm_config, *, name_prefix: Optional[str] = None,
                                bind_kwargs: Optional[dict] = None,
                                override_serve_options: Optional[dict] = None):
    """``ray.serve.llm.build_dp_deployment`` for gangs that heal in place."""
    from ray.serve.llm import build_dp_deployment

    from vllm_elastic_ft.ray_serve.server import ElasticDPServer

    return build_dp_deployment(prepare_llm_config(llm_config), name_prefix=name_prefix,
                               bind_kwargs=bind_kwargs,
                               override_serve_options=override_serve_options,
                               deployment_cls=ElasticDPServer)


def build_elastic_dp_openai_app(llm_config, *, name_prefix: Optional[str] = None):
    """An OpenAI-compatible app over elastic DP gangs: Ray Serve LLM's ingress, whose
    requests outlive the replica process they ran on (:mod:`.ingress`)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import make_fastapi_ingress

    from vllm_elastic_ft.ray_serve.ingress import ElasticOpenAiIngress

    prepared = prepare_llm_config(llm_config)
    gangs = build_elastic_dp_deployment(prepared, name_prefix=name_prefix)
    ingress_cls = make_fastapi_ingress(ElasticOpenAiIngress)
    options = ElasticOpenAiIngress.get_deployment_options([prepared])
    model_id = prepared.model_id
    loading = prepared.model_loading_config
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={model_id: gangs},
        model_cards={model_id: to_model_metadata(model_id, prepared)},
        tokenizer_sources={model_id: loading.tokenizer_source or loading.model_source},
    )
