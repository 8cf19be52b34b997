"""The plugin's flags on vLLM's real parser, folded into additional_config."""

import json

import pytest

from vllm_elastic_ft.config import ElasticFTConfigError
from vllm_elastic_ft.plugin import register


@pytest.fixture(scope="module")
def parser():
    register()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


@pytest.fixture
def engine_args(parser, tiny_moe_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    def parse(argv):
        return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", tiny_moe_path, *argv]))

    return parse


def test_flags_fold_into_additional_config(engine_args):
    args = engine_args([
        "--no-elastic-ft-cpu-expert-parallel", "--elastic-ft-cpu-dispatch", "allgather",
        "--additional-config", json.dumps({"elastic_ft": {"cpu_dispatch": "all_to_all"}, "x": 1}),
    ])
    assert args.additional_config == {
        "x": 1,
        "elastic_ft": {"cpu_dispatch": "allgather", "cpu_expert_parallel": False},
    }


def test_no_flags_leave_additional_config_alone(engine_args):
    assert engine_args([]).additional_config == {}


def test_bad_flag_value_is_rejected_by_the_parser(parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--model", "m", "--elastic-ft-cpu-dispatch", "ring"])
    assert exit_info.value.code == 2
    assert "'ring'" in capsys.readouterr().err


def test_create_engine_config_validates_before_anything_else(engine_args):
    args = engine_args(["--additional-config", '{"elastic_ft": {"nope": true}}'])
    with pytest.raises(ElasticFTConfigError, match="unknown key elastic_ft.'nope'"):
        args.create_engine_config()


@pytest.mark.parametrize("argv", [
    ["--additional-config", '{"elastic_ft": {"deadline_s": NaN}}'],
    ["--elastic-ft-deadline-s", "nan"],
], ids=["json", "flag"])
def test_nan_is_refused_before_anything_else(engine_args, argv):
    # argparse's float() and json.loads both accept NaN; NaN passes any range check.
    args = engine_args(argv)
    with pytest.raises(ElasticFTConfigError,
                       match=r"elastic_ft\.deadline_s must be a finite number in .*got nan"):
        args.create_engine_config()


@pytest.fixture
def no_spawn_side_effects(monkeypatch):
    """Record, instead of doing, what create_engine_config does after validation
    (export the config to the environment, host the watchdog store)."""
    from vllm_elastic_ft.vllm.patches.api_server import engine_args as module

    done = []
    monkeypatch.setattr(module, "export_config", lambda config: done.append("export"))
    monkeypatch.setattr(module, "host_store", lambda config: done.append("store"))
    return done


def test_min_live_ranks_above_the_dp_size_stops_start_up(engine_args, no_spawn_side_effects):
    # The real vLLM create_engine_config runs (it builds the configs, loads no model).
    args = engine_args(["--data-parallel-size", "2", "--enable-expert-parallel",
                        "--elastic-ft-min-live-ranks", "5"])
    with pytest.raises(ElasticFTConfigError) as err:
        args.create_engine_config()
    for fragment in ["elastic_ft.min_live_ranks (5)", "data_parallel_size (2)"]:
        assert fragment in str(err.value)
    # Refused before the store is hosted and the config exported to the engines.
    assert no_spawn_side_effects == []


def test_min_live_ranks_is_checked_against_the_built_parallel_config(no_spawn_side_effects):
    """The check reads the DP size of the config vLLM built, and an equal minimum passes."""
    from types import SimpleNamespace

    from vllm_elastic_ft.vllm.patches.api_server.engine_args import _make_create_engine_config

    def built(dp):  # stands for vLLM's create_engine_config
        return lambda self: SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=dp))

    args = SimpleNamespace(additional_config={"elastic_ft": {"min_live_ranks": 4}})
    assert _make_create_engine_config(built(4))(args).parallel_config.data_parallel_size == 4
    assert no_spawn_side_effects == ["export", "store"]
    with pytest.raises(ElasticFTConfigError,
                       match=r"min_live_ranks \(4\).*data_parallel_size \(3\)"):
        _make_create_engine_config(built(3))(args)
    assert no_spawn_side_effects == ["export", "store"]  # nothing more after the refusal
