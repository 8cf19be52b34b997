"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once per process (API server, each engine core,
each worker; the DP coordinator excepted), sometimes more than once. It applies
the patches of this process's role only (``vllm/process_role.py``,
``patches.BY_ROLE``), or every patch in a process it cannot place. Each patch
is idempotent; vLLM and the patch modules are imported lazily, so that loading
the entry point costs nothing until vLLM asks for it. With the plugin switched
off in the config (``enabled: false``) the patches are applied all the same and
each one hands over to stock vLLM.
"""

from __future__ import annotations

import multiprocessing

from vllm_elastic_ft.logging_utils import get_logger

logger = get_logger(__name__)

_registered = False


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


def register() -> None:
    """Apply this process's vllm-elastic-ft patches to its vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    roles, modules = patch_modules()
    for module in modules:
        module.apply()
    _registered = True
    name = multiprocessing.current_process().name
    if roles is None:
        logger.info("vllm-elastic-ft: process %r is no API server, engine core or worker "
                    "that the plugin knows; applied every patch", name)
    logger.debug("vllm-elastic-ft patches applied in process %r (roles %s): %s", name,
                 list(roles) if roles else "unknown", [m.__name__ for m in modules])
