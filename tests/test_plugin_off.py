"""``enabled: false`` leaves vLLM as stock: no patch is applied (``plugin.py``).

Each case runs in a fresh interpreter: per step, ``plugin.register()`` as the vLLM
process the step is named like (``multiprocessing``'s process name, as vLLM sets
it), then a comparison of every patch target of ``patches.ALL`` (their ``SPECS``)
with what the interpreter had before the first step. The only patches a disabled
plugin keeps are the front end's ``EngineArgs`` ones: vLLM loads the plugin
before it parses ``--no-elastic-ft``, and they are what reads the config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

#: Run in the child: ``argv[1]`` is a JSON list of steps, each
#: ``{"name": process name, "argv": None or engine CLI args, "forks": bool}``. A step
#: registers the plugin as a process of that name (``forks``: one that forks its
#: children, as vLLM does on a GPU; ``argv``: then parses ``argv`` with the patched
#: parser and builds the engine config). Prints, per step, the targets that are not
#: what the interpreter started with, and which of them carry the patch marker.
_CHILD = r"""
import inspect, json, multiprocessing, os, sys

from vllm_elastic_ft.vllm import patches, process_role
from vllm_elastic_ft.vllm.patching import is_patched

def targets():
    found = {}
    for module in patches.ALL:
        for spec in module.SPECS:
            if spec.available():
                owner, name = spec.owner_and_name
                found[spec.target] = inspect.getattr_static(owner, name)
    return found

def unwrap(attr):
    return getattr(attr, "__func__", attr)

stock = targets()
from vllm.v1.engine.core import DPEngineCoreProc
from vllm_elastic_ft import plugin

report = []
for step in json.loads(sys.argv[1]):
    multiprocessing.current_process().name = step["name"]
    if step.get("forks"):
        process_role.children_are_forked = lambda: True
    plugin._registered = False
    plugin.register()
    seen = {}
    now = targets()
    seen["changed"] = sorted(t for t in stock if now[t] is not stock[t])
    seen["marked"] = sorted(t for t in stock if is_patched(unwrap(now[t])))
    if step["argv"] is not None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
        AsyncEngineArgs.from_cli_args(parser.parse_args(step["argv"])).create_engine_config()
        built = targets()
        seen["after_config"] = sorted(t for t in stock if built[t] is not stock[t])
        seen["after_config_marked"] = sorted(t for t in stock
                                             if is_patched(unwrap(built[t])))
        seen["exported"] = json.loads(os.environ["VLLM_ELASTIC_FT_CONFIG"])
    seen["utilities"] = hasattr(DPEngineCoreProc, "elastic_ft_admit")
    report.append(seen)
print("REPORT " + json.dumps(report))
"""


def _run(steps: list[dict], exported: dict | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ELASTIC_FT_CONFIG", "VLLM_ENABLE_V1_MULTIPROCESSING",
                        "TORCHELASTIC_RUN_ID", "VLLM_ELASTIC_FT_STORE")}
    env["VLLM_PLUGINS"] = ""  # only the register() calls of the script, none of vLLM's
    if exported is not None:
        env["VLLM_ELASTIC_FT_CONFIG"] = json.dumps(exported)
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(steps)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    return json.loads(line[len("REPORT "):])


def _targets(*modules: str) -> set[str]:
    """The targets of ``patches.<role>.<module>`` for each of ``modules``."""
    from vllm_elastic_ft.vllm import patches

    names = {f"{patches.__name__}.{m}" for m in modules}
    return {spec.target for module in patches.ALL if module.__name__ in names
            for spec in module.SPECS if spec.available()}


def _engine_args_targets() -> set[str]:
    from vllm_elastic_ft.vllm.patches.api_server import engine_args

    return {spec.target for spec in engine_args.SPECS}


def test_engine_processes_of_a_disabled_deployment_get_no_patch():
    """The front end exported ``enabled: false`` before it spawned them (as it does), so an
    engine core and a worker know it when vLLM loads the plugin there."""
    core, worker, front = _run([{"name": "EngineCore_DP0", "argv": None},
                                {"name": "VllmWorker-0", "argv": None},
                                {"name": "MainProcess", "argv": None}],
                               exported={"enabled": False})
    assert core["changed"] == [] and core["marked"] == [], "an engine core is stock vLLM"
    assert not core["utilities"], "nor are the engine-core utilities added"
    assert worker["changed"] == [] and worker["marked"] == [], "a worker is stock vLLM"
    # A front end still reads its own config (its flags, their folding, its validation).
    assert set(front["changed"]) == set(front["marked"]) == _engine_args_targets()


def test_the_same_processes_get_their_patches_when_enabled():
    """The control: what the disabled case leaves out is applied when enabled."""
    [core] = _run([{"name": "EngineCore_DP0", "argv": None}], exported={"enabled": True})
    from vllm_elastic_ft.vllm.patches import BY_ROLE

    expected = {s.target for m in BY_ROLE["engine_core"] for s in m.SPECS if s.available()}
    assert expected <= set(core["marked"]) and core["utilities"]


@pytest.mark.parametrize("forks", [False, True], ids=["spawns", "forks"])
def test_a_front_end_started_with_no_elastic_ft_keeps_only_the_config_patches(tiny_moe_path,
                                                                              forks):
    """``vllm serve --no-elastic-ft``: nothing says off when vLLM loads the plugin, so the
    front end's patches are applied; once create_engine_config has read the flag (before
    any engine or engine client exists) all but the EngineArgs ones are removed, and the
    engines are told (the exported config). The second step is a front end that inherited
    that "off" export but is started with the plugin on: its own config wins. A front end
    that forks its engines (vLLM's default on a GPU) holds their patches too, and they go
    as well: the forked engines inherit stock vLLM."""
    model = ["--model", tiny_moe_path]
    off, on = _run([{"name": "MainProcess", "argv": [*model, "--no-elastic-ft"], "forks": forks},
                    {"name": "MainProcess", "argv": model, "forks": forks}], exported=None)
    front = _targets("api_server.request_routing", "api_server.no_cascade")
    if forks:  # the engine core's and the worker's patches are the front end's too
        front |= _targets("engine_core.engine_sync", "worker.dp_sync")
    assert front and front <= set(off["marked"]), "applied at load: the config was unknown"
    assert set(off["after_config"]) == set(off["after_config_marked"]) == _engine_args_targets()
    assert off["exported"]["enabled"] is False
    assert set(on["marked"]) == _engine_args_targets(), "the inherited export said off"
    assert front <= set(on["after_config_marked"]) and on["exported"]["enabled"] is True
