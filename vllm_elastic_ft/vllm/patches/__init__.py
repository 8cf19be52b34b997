"""The plugin's vLLM patches, by the process they act in, one module per vLLM area.

Each module defines ``SPECS`` (its registry entries, see ``patching.PatchSpec``)
and ``apply()``. The subpackages hold the patches of one kind of vLLM process
(``vllm/process_role.py`` says which one this is):

* ``api_server``: the front end, where engine arguments are parsed and the
  engine client runs (``vllm serve``, a Ray Serve replica);
* ``engine_core``: an engine-core process (scheduler, DP state, busy loop);
* ``worker``: a worker process (model runner, communicators, MoE experts).

``plugin.register`` applies ``BY_ROLE[process_role()]`` (every patch, ``ALL``,
in a process it cannot place). A patch needed in two kinds of process is listed
under both.
"""

from vllm_elastic_ft.vllm.patches import api_server, engine_core, worker

BY_ROLE = {
    "api_server": api_server.MODULES,
    "engine_core": engine_core.MODULES,
    "worker": worker.MODULES,
}

#: Every patch module once (the registry and its tests read this).
ALL = tuple(dict.fromkeys(module for modules in BY_ROLE.values() for module in modules))
