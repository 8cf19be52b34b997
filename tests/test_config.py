"""ElasticFTConfig validation: every bad input names the key and what is accepted."""

import pytest

from vllm_elastic_ft.config import CONFIG_KEY, ElasticFTConfig, ElasticFTConfigError


def test_defaults_when_absent():
    assert ElasticFTConfig.from_additional_config(None) == ElasticFTConfig()
    assert ElasticFTConfig.from_additional_config({"other_plugin": 1}) == ElasticFTConfig()


def test_valid_values_round_trip():
    raw = {"enabled": False, "cpu_dispatch": "allgather"}
    config = ElasticFTConfig.from_additional_config({CONFIG_KEY: raw})
    assert config.enabled is False and config.cpu_dispatch == "allgather"
    assert ElasticFTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "raw, fragments",
    [
        ({"bogus": 1}, ["'bogus'", "accepted keys", "cpu_dispatch", "enabled"]),
        ({"enabled": "yes"}, ["elastic_ft.enabled", "true or false", "'yes'"]),
        ({"enabled": 1}, ["elastic_ft.enabled", "true or false"]),
        ({"cpu_dispatch": "ring"}, ["elastic_ft.cpu_dispatch", "'all_to_all'", "'allgather'", "'ring'"]),
        ({"cpu_dispatch": 3}, ["elastic_ft.cpu_dispatch", "string"]),
        ([1, 2], ["must be a JSON object", "keys"]),
    ],
)
def test_bad_values_are_named(raw, fragments):
    with pytest.raises(ElasticFTConfigError) as err:
        ElasticFTConfig.from_dict(raw)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_numeric_limits_are_checked():
    import dataclasses

    from vllm_elastic_ft import config as config_module

    @dataclasses.dataclass(frozen=True)
    class Limited(ElasticFTConfig):
        deadline_s: float = config_module._setting(5.0, "a deadline", min=1.0, max=60.0)

    assert Limited.from_dict({"deadline_s": 2}).deadline_s == 2.0
    with pytest.raises(ElasticFTConfigError, match=r"deadline_s must be in \[1.0, 60.0\], got 0.5"):
        Limited.from_dict({"deadline_s": 0.5})
    with pytest.raises(ElasticFTConfigError, match="deadline_s must be a number"):
        Limited.from_dict({"deadline_s": True})


def test_controller_options_come_from_the_config():
    config = ElasticFTConfig.from_dict({"rebuild_budget_s": 5, "max_rebuilds": 2, "slow_strikes": 1})
    options = config.controller_options()
    assert (options.rebuild_budget_s, options.max_rebuilds, options.slow_strikes) == (5.0, 2, 1)
    with pytest.raises(ElasticFTConfigError, match=r"max_rebuilds must be in \[1, 100\], got 0"):
        ElasticFTConfig.from_dict({"max_rebuilds": 0})
