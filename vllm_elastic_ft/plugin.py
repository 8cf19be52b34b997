"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once per process (API server, each engine core,
each worker; the DP coordinator excepted), sometimes more than once. It applies
the patches of this process's role only (``vllm/process_role.py``,
``patches.BY_ROLE``), or every patch in a process it cannot place. Each patch
is idempotent; vLLM and the patch modules are imported lazily, so that loading
the entry point costs nothing until vLLM asks for it.

With the plugin switched off (``enabled: false``) no patch is applied, except
the front end's ``EngineArgs`` patches (``patches/api_server/engine_args.py``):
vLLM loads the plugin before it parses ``--no-elastic-ft`` or
``--additional-config``, and those patches are what reads the config (the
flags, their folding, the validation and its export to the engine processes).

* An engine core or worker knows the config when vLLM loads the plugin there:
  the front end exported it before it spawned them (``process_config.py``). Off:
  nothing is applied.
* A front end (API server, Ray Serve replica, offline ``LLM``) knows it only
  once ``EngineArgs.create_engine_config`` has validated it. Until then every
  patch of the process is applied (unless a config exported by a parent already
  says off); right after it, before any engine or engine client exists, the
  patches follow the config: off removes all but the ``EngineArgs`` ones
  (``patching.remove_patch``), on applies any that were held back.
* A process whose config is unknown and that never builds an engine config (one
  the plugin cannot place) keeps the patches, and each hands over to stock vLLM
  when the config says off.

What a removal cannot take back: the engine-core utilities that
``patches/engine_core/replacement.py`` adds (new methods, no ``PatchSpec``) stay
in a front end that forks its engines; stock vLLM never calls them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from typing import TYPE_CHECKING

from vllm_elastic_ft.logging_utils import get_logger

if TYPE_CHECKING:
    from vllm_elastic_ft.config import ElasticFTConfig

logger = get_logger(__name__)

_registered = False

#: Tag of the step after the front end's create_engine_config (patching.run_after).
_SETTLE = "elastic_ft_settle"


def patch_modules() -> tuple[tuple[str, ...] | None, tuple]:
    """``(roles, modules)``: this process's roles (None: not placed) and their patches."""
    from vllm_elastic_ft.vllm import patches
    from vllm_elastic_ft.vllm.process_role import process_role, roles_here

    role = process_role()
    if role is None:
        return None, patches.ALL
    roles = roles_here(role)
    modules = dict.fromkeys(m for r in roles for m in patches.BY_ROLE[r])
    return roles, tuple(modules)


def config_modules() -> tuple:
    """The patch modules applied even with the plugin off: those that read the config."""
    from vllm_elastic_ft.vllm.patches.api_server import engine_args

    return (engine_args,)


def known_config() -> ElasticFTConfig | None:
    """This process's config if it can be known when vLLM loads the plugin, else None.

    The front end's export (``VLLM_ELASTIC_FT_CONFIG``), else vLLM's current config.
    Parsed here without ``process_config()``, which would keep it: in a front end an
    inherited export can be stale until ``create_engine_config`` exports its own.
    """
    from vllm_elastic_ft.config import CONFIG_KEY, ElasticFTConfig
    from vllm_elastic_ft.vllm.process_config import CONFIG_ENV

    exported = os.environ.get(CONFIG_ENV)
    if exported:
        return ElasticFTConfig.from_additional_config({CONFIG_KEY: json.loads(exported)})
    from vllm.config import get_current_vllm_config_or_none

    current = get_current_vllm_config_or_none()
    if current is None:
        return None
    return ElasticFTConfig.from_additional_config(current.additional_config)


def register() -> None:
    """Apply this process's vllm-elastic-ft patches to its vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    roles, modules = patch_modules()
    config = known_config()
    off = config is not None and not config.enabled
    if off:
        modules = tuple(m for m in modules if m in config_modules())
    for module in modules:
        module.apply()
    if any(m in config_modules() for m in modules):
        _follow_the_front_end_config()
    _registered = True
    name = multiprocessing.current_process().name
    if off:
        logger.info("vllm-elastic-ft: disabled (enabled: false) in process %r; patches "
                    "applied: %s", name, [m.__name__ for m in modules] or "none")
    elif roles is None:
        logger.info("vllm-elastic-ft: process %r is no API server, engine core or worker "
                    "that the plugin knows; applied every patch", name)
    logger.debug("vllm-elastic-ft patches applied in process %r (roles %s): %s", name,
                 list(roles) if roles else "unknown", [m.__name__ for m in modules])


def _follow_the_front_end_config() -> None:
    """Settle this process's patches right after its create_engine_config read the config."""
    from vllm_elastic_ft.vllm.patches.api_server import engine_args
    from vllm_elastic_ft.vllm.patching import run_after

    run_after(engine_args.CREATE_ENGINE_CONFIG, _settle, tag=_SETTLE)


def _settle(_engine_config, engine_args_obj, *args, **kwargs) -> None:
    """After ``EngineArgs.create_engine_config`` (validated, exported): before any engine
    or engine client exists, make this process's patches what its config says."""
    from vllm_elastic_ft.config import ElasticFTConfig
    from vllm_elastic_ft.vllm import patches
    from vllm_elastic_ft.vllm.patching import remove_patch

    config = ElasticFTConfig.from_additional_config(engine_args_obj.additional_config)
    if config.enabled:
        # Idempotent: applies only those that an inherited "off" export held back.
        for module in patch_modules()[1]:
            module.apply()
        return
    keep = config_modules()
    removed = [spec.target for module in patches.ALL if module not in keep
               for spec in module.SPECS if remove_patch(spec)]
    if removed:
        logger.info("vllm-elastic-ft: disabled (enabled: false); removed %d patch(es), only "
                    "the EngineArgs config patches stay: %s", len(removed), removed)
