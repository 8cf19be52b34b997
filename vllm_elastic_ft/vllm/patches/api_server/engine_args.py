"""Front-end patches: the plugin's ``vllm serve`` flags and start-up validation.

vLLM 0.32 has no plugin flag hook, but it loads general plugins inside
``AsyncEngineArgs.add_cli_args`` right before it calls
``EngineArgs.add_cli_args``; patching that static method lets the plugin add an
"elastic-ft" argument group to the real parser. ``EngineArgs.from_cli_args``
folds those flags into ``additional_config["elastic_ft"]`` (the carrier that
reaches every engine process and that Ray Serve ``engine_kwargs`` uses), and
``EngineArgs.create_engine_config`` validates the result before any config is
built or any model is loaded, and checks it against the DP size of the config it
built (``ElasticFTConfig.check_for_world``) before any engine is spawned.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from vllm_elastic_ft.config import CONFIG_KEY, ElasticFTConfig
from vllm_elastic_ft.logging_utils import get_logger
from vllm_elastic_ft.vllm.patching import CHECKED_WITH_0_33, PatchSpec, apply_patch
from vllm_elastic_ft.vllm.process_config import export_config
from vllm_elastic_ft.vllm.watchdog_store import host_store

logger = get_logger(__name__)

_MODULE = "vllm.engine.arg_utils"

ADD_CLI_ARGS = PatchSpec(
    target=f"{_MODULE}:EngineArgs.add_cli_args",
    why="vLLM has no hook for a plugin to add flags to `vllm serve`.",
    how="Call the original, then add the --elastic-ft* argument group.",
    upstream="none (plugins are loaded before the parser is built, by design)",
    remove_when="vLLM grows a plugin CLI-argument hook.",
    params=("parser",),
    vllm_versions=CHECKED_WITH_0_33,
)
FROM_CLI_ARGS = PatchSpec(
    target=f"{_MODULE}:EngineArgs.from_cli_args",
    why="Flags outside EngineArgs' dataclass fields are dropped.",
    how="Fold explicitly given --elastic-ft* flags into "
    "additional_config['elastic_ft'] (a flag wins over the same JSON key).",
    upstream="none",
    remove_when="vLLM grows a plugin CLI-argument hook.",
    params=("cls", "args"),
    vllm_versions=CHECKED_WITH_0_33,
)
CREATE_ENGINE_CONFIG = PatchSpec(
    target=f"{_MODULE}:EngineArgs.create_engine_config",
    why="additional_config is an opaque dict: vLLM never validates a plugin's keys.",
    how="Validate additional_config['elastic_ft'] first; a bad key stops start-up "
    "before any model loads. Check it against the built config's data_parallel_size "
    "(min_live_ranks). With DP>1, host the watchdog store before engines spawn.",
    upstream="none",
    remove_when="never (plugin-owned validation).",
    params=("self",),
    vllm_versions=CHECKED_WITH_0_33,
)

SPECS = (ADD_CLI_ARGS, FROM_CLI_ARGS, CREATE_ENGINE_CONFIG)


def flag_name(key: str) -> str:
    """``cpu_dispatch`` -> ``--elastic-ft-cpu-dispatch``; ``enabled`` -> ``--elastic-ft``."""
    return "--elastic-ft" if key == "enabled" else "--elastic-ft-" + key.replace("_", "-")


def _dest(key: str) -> str:
    return f"elastic_ft__{key}"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ElasticFTConfig` field (default None: not given)."""
    if any(getattr(a, "dest", "") == _dest("enabled") for a in parser._actions):
        return  # already added to this parser
    group = parser.add_argument_group(
        title="vllm-elastic-ft",
        description="Settings of the vllm-elastic-ft plugin; each may also be given "
        f"in --additional-config '{{\"{CONFIG_KEY}\": {{...}}}}'.",
    )
    for f in dataclasses.fields(ElasticFTConfig):
        kwargs: dict[str, Any] = dict(dest=_dest(f.name), default=None, help=f.metadata["help"])
        kind = type(f.default)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"])
        group.add_argument(flag_name(f.name), **kwargs)


def fold_flags(args: argparse.Namespace, additional_config: dict | None) -> dict:
    """``additional_config`` with the given --elastic-ft* flags merged in."""
    given = {
        f.name: getattr(args, _dest(f.name))
        for f in dataclasses.fields(ElasticFTConfig)
        if getattr(args, _dest(f.name), None) is not None
    }
    merged = dict(additional_config or {})
    if given:
        section = merged.get(CONFIG_KEY)
        merged[CONFIG_KEY] = {**(section if isinstance(section, dict) else {}), **given}
    return merged


def _make_add_cli_args(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_cli_args(parser):
        parser = original(parser)
        add_flags(parser)
        return parser

    return add_cli_args


def _make_from_cli_args(original: Callable[..., Any]) -> Callable[..., Any]:
    def from_cli_args(cls, args):
        engine_args = original(cls, args)
        engine_args.additional_config = fold_flags(args, engine_args.additional_config)
        return engine_args

    return from_cli_args


def _make_create_engine_config(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_engine_config(self, *args, **kwargs):
        config = ElasticFTConfig.from_additional_config(self.additional_config)
        logger.info("vllm-elastic-ft config: %s", config.to_json())
        engine_config = original(self, *args, **kwargs)
        # The DP size of the built config, not self.data_parallel_size: vLLM may set it
        # otherwise (offline SPMD takes it from VLLM_DP_SIZE). Still before any engine
        # is spawned, so a min_live_ranks the group can never reach stops start-up here.
        config.check_for_world(engine_config.parallel_config.data_parallel_size)
        # The engine-core and worker processes spawned after this inherit it.
        export_config(config)
        if kwargs.get("headless"):  # vLLM's headless launcher: the front end is elsewhere
            from vllm_elastic_ft.vllm import headless

            headless.mark(config, engine_config, log_stats=not self.disable_log_stats)
        # Engine processes are spawned after this: host the watchdog store now
        # so that they inherit its address.
        if engine_config.parallel_config.data_parallel_size > 1:
            host_store(config)
        return engine_config

    return create_engine_config


def apply() -> None:
    apply_patch(ADD_CLI_ARGS, _make_add_cli_args, kind="staticmethod")
    apply_patch(FROM_CLI_ARGS, _make_from_cli_args, kind="classmethod")
    apply_patch(CREATE_ENGINE_CONFIG, _make_create_engine_config)
