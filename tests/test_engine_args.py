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
