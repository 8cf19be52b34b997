"""``vllm-elastic-ft patches``: the registry checked against a vLLM tree (``vllm/compat.py``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vllm_elastic_ft.cli import main
from vllm_elastic_ft.vllm.compat import (
    build_report,
    find_package_dir,
    read_version,
    run_report,
    signature,
    signature_diff,
)
from vllm_elastic_ft.vllm.patching import installed_vllm_version
from vllm_elastic_ft.vllm.private_access import all_entries

_FORWARD = "vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward"
_DUMMY_RUN = "vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_run"
_DPLB = "vllm.v1.engine.core_client:DPLBAsyncMPClient"
_CALL_ONE = "vllm.v1.engine.core_client:AsyncMPClient._call_utility_async"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture()
def fake_tree(tmp_path: Path) -> Path:
    """A vLLM 0.99.0 tree where ``_model_forward`` lost ``input_ids`` (and ``_dummy_run``
    moved to a base class in another module), and ``DPLBAsyncMPClient`` is gone."""
    _write(tmp_path, {
        "vllm/__init__.py": "",
        "vllm/_version.py": "__version__ = version = '0.99.0'\n",
        "vllm/v1/worker/runner_base.py": """
            class RunnerBase:
                def _dummy_run(self, num_tokens, **kwargs):
                    self._warm = True
            """,
        "vllm/v1/worker/gpu_model_runner.py": """
            from vllm.v1.worker import runner_base as rb

            class GPUModelRunner(rb.RunnerBase):
                def _model_forward(self, positions=None, **model_kwargs):
                    return positions
            """,
        "vllm/v1/engine/core_client.py": """
            class AsyncMPClient:
                async def _call_utility_async(self, method, *args, engine):
                    pass
            """,
    })
    return tmp_path


def _by_target(report) -> dict:
    return {e.target: e for e in report.entries}


# ---------------------------------------------------------------- the installed vLLM

def test_installed_vllm_every_entry_exists_and_matches():
    report = build_report()
    bad = [(e.target, e.detail or e.missing_params or e.signature_change)
           for e in report.entries if not e.ok]
    assert not bad
    assert report.ok and report.vllm_version == installed_vllm_version()
    assert len(report.entries) == len(all_entries())
    for entry in report.entries:
        assert entry.exists and entry.version_supported, entry.target
        assert entry.signature_change in ("unchanged", "n/a"), entry.target
        if entry.kind == "patch":
            assert entry.params_ok and entry.signature, entry.target


def test_cli_table_and_json_against_installed(capsys):
    assert main(["patches"]) == 0
    table = capsys.readouterr().out
    assert "TARGET" in table and f"vLLM {installed_vllm_version()}" in table
    assert main(["patches", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["vllm_version"] == installed_vllm_version()
    assert {e["target"] for e in data["entries"]} == {e.target for e in all_entries()}
    assert all(e["ok"] and e["exists"] for e in data["entries"])


def test_report_does_not_import_vllm():
    code = ("import sys; from vllm_elastic_ft.vllm.compat import build_report; "
            "build_report(); print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- a changed vLLM

def test_fake_tree_lost_parameter_and_missing_class(fake_tree):
    report = build_report(fake_tree)
    assert report.vllm_version == "0.99.0" and not report.ok
    entries = _by_target(report)

    forward = entries[_FORWARD]
    assert forward.exists and forward.params_ok is False and not forward.ok
    assert forward.missing_params == ["input_ids"]
    assert "removed input_ids" in forward.signature_change

    dummy = entries[_DUMMY_RUN]  # inherited through ``rb.RunnerBase`` from another module
    assert dummy.exists and dummy.found_in == "vllm.v1.worker.runner_base:RunnerBase._dummy_run"

    for target, entry in entries.items():
        if target.startswith(_DPLB + "."):
            assert entry.module_found and entry.class_found is False and not entry.ok
            assert "class DPLBAsyncMPClient not found" in entry.detail

    call_one = entries[_CALL_ONE]
    assert call_one.ok and call_one.signature_change == "unchanged"
    assert not any(e.version_supported for e in report.entries)
    missing_module = entries["vllm.distributed.parallel_state:_DP"]
    assert not missing_module.module_found and not missing_module.exists


@pytest.mark.parametrize("as_package_dir", [False, True])
def test_cli_exits_1_and_json_parses(fake_tree, capsys, as_package_dir):
    source = fake_tree / "vllm" if as_package_dir else fake_tree
    assert main(["patches", "--vllm-source", str(source), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["vllm_version"] == "0.99.0"
    forward = next(e for e in data["entries"] if e["target"] == _FORWARD)
    assert forward["missing_params"] == ["input_ids"] and forward["ok"] is False
    assert main(["patches", "--vllm-source", str(source)]) == 1
    table = capsys.readouterr().out
    assert "FAIL" in table and "missing parameters ['input_ids']" in table


def test_not_a_vllm_tree(tmp_path, capsys):
    assert run_report(tmp_path / "nothing") == 2
    assert "neither a vllm package" in capsys.readouterr().err


# ---------------------------------------------------------------- pieces

def test_version_from_wheel_metadata(tmp_path):
    _write(tmp_path, {
        "vllm/__init__.py": "",
        "vllm_elastic_ft-0.1.0.dist-info/METADATA": "Name: vllm-elastic-ft\nVersion: 0.1.0\n",
        "vllm-0.99.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: vllm\nVersion: 0.99.1\n",
        "vllm-0.99.1.dist-info/RECORD": "vllm/__init__.py,sha256=x,0\n",
    })
    assert read_version(find_package_dir(tmp_path)) == "0.99.1"
    assert read_version(find_package_dir(tmp_path / "vllm")) == "0.99.1"


def _sig(source: str) -> list[str]:
    return signature(ast.parse(textwrap.dedent(source)).body[0].body[0])


def test_signature_diff_sees_binding_and_parameter_changes():
    static = _sig("""
        class C:
            @staticmethod
            def f(a, b, *, c=1): ...
        """)
    method = _sig("""
        class C:
            def f(self, a, b, *, c=1): ...
        """)
    assert static == ["staticmethod", "a", "b", "*", "c="]
    assert signature_diff(static, static) == "unchanged"
    assert signature_diff(static, method) == "changed: staticmethod -> method; added self"
    defaults = _sig("""
        class C:
            def f(self, a, b=2, *, c=1): ...
        """)
    assert signature_diff(method, defaults) == "changed: (self, a, b, *, c=) -> (self, a, b=, *, c=)"
