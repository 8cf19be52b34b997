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


def _fields_of(kind):
    import dataclasses

    return [f for f in dataclasses.fields(ElasticFTConfig) if type(f.default) is kind]


FLOAT_FIELDS = _fields_of(float)
INT_FIELDS = _fields_of(int)


def test_every_numeric_setting_is_covered_below():
    # The parametrized tests below run over these lists: make sure they are not empty
    # (a refactor that changed the defaults' types would silently test nothing).
    assert {"deadline_s", "rebuild_budget_s", "join_window_s"} <= {f.name for f in FLOAT_FIELDS}
    assert {"max_rebuilds", "min_live_ranks"} <= {f.name for f in INT_FIELDS}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("f", FLOAT_FIELDS, ids=lambda f: f.name)
def test_non_finite_numbers_are_refused_naming_key_value_and_range(f, value):
    # NaN compares False with both limits: only an explicit check refuses it.
    with pytest.raises(ElasticFTConfigError) as err:
        ElasticFTConfig.from_dict({f.name: value})
    message = str(err.value)
    assert f"{CONFIG_KEY}.{f.name} " in message
    assert f"got {value!r}" in message
    assert f"[{f.metadata['min']}, {f.metadata['max']}]" in message


def test_nan_from_json_is_refused():
    # What `--additional-config '{"elastic_ft": {"deadline_s": NaN}}'` hands over
    # (Python's json accepts NaN and Infinity).
    import json

    additional = json.loads('{"elastic_ft": {"deadline_s": NaN}}')
    with pytest.raises(ElasticFTConfigError,
                       match=r"elastic_ft\.deadline_s must be a finite number in "
                             r"\[0\.1, 3600\.0\], got nan"):
        ElasticFTConfig.from_additional_config(additional)


def test_an_int_too_large_for_a_float_is_a_config_error():
    # float(10**400) raises OverflowError: it must come out as the config's own error.
    with pytest.raises(ElasticFTConfigError,
                       match=r"elastic_ft\.rebuild_budget_s .*\[0\.1, 3600\.0\]"):
        ElasticFTConfig.from_dict({"rebuild_budget_s": 10**400})


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("f", INT_FIELDS, ids=lambda f: f.name)
def test_bool_is_not_an_integer(f, value):
    # bool is a subclass of int (True == 1 is inside most ranges).
    with pytest.raises(ElasticFTConfigError,
                       match=rf"elastic_ft\.{f.name} must be an integer, got {value}"):
        ElasticFTConfig.from_dict({f.name: value})


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("f", FLOAT_FIELDS, ids=lambda f: f.name)
def test_bool_is_not_a_number(f, value):
    with pytest.raises(ElasticFTConfigError,
                       match=rf"elastic_ft\.{f.name} must be a number, got {value}"):
        ElasticFTConfig.from_dict({f.name: value})


def test_bool_for_int_and_float_examples():
    # The two cases of the issue, spelled out.
    with pytest.raises(ElasticFTConfigError,
                       match=r"elastic_ft\.max_rebuilds must be an integer, got True"):
        ElasticFTConfig.from_dict({"max_rebuilds": True})
    with pytest.raises(ElasticFTConfigError,
                       match=r"elastic_ft\.deadline_s must be a number, got True"):
        ElasticFTConfig.from_dict({"deadline_s": True})


def test_defaults_pass_the_relations():
    assert ElasticFTConfig.from_dict({}) == ElasticFTConfig()
    assert ElasticFTConfig.from_dict(ElasticFTConfig().to_dict()) == ElasticFTConfig()


@pytest.mark.parametrize(
    "raw, fragments",
    [
        # deadline_s > heartbeat_interval_s (equal is refused too)
        ({"deadline_s": 0.1}, ["elastic_ft.deadline_s (0.1)", "greater than",
                               "elastic_ft.heartbeat_interval_s (0.1)", "cannot be watched"]),
        ({"deadline_s": 0.5, "heartbeat_interval_s": 1.0},
         ["elastic_ft.deadline_s (0.5)", "elastic_ft.heartbeat_interval_s (1.0)"]),
        # warmup_deadline_s is 0 or > heartbeat_interval_s
        ({"warmup_deadline_s": 0.05}, ["elastic_ft.warmup_deadline_s (0.05)",
                                       "must be 0 (no deadline)", "greater than",
                                       "elastic_ft.heartbeat_interval_s (0.1)"]),
        ({"warmup_deadline_s": 1.0, "heartbeat_interval_s": 1.0},
         ["elastic_ft.warmup_deadline_s (1.0)", "elastic_ft.heartbeat_interval_s (1.0)"]),
        # rebuild_budget_s > join_window_s (default window 3.0)
        ({"rebuild_budget_s": 2}, ["elastic_ft.rebuild_budget_s (2.0)", "greater than",
                                   "elastic_ft.join_window_s (3.0)", "join window must fit"]),
        ({"rebuild_budget_s": 10, "join_window_s": 10},
         ["elastic_ft.rebuild_budget_s (10.0)", "elastic_ft.join_window_s (10.0)"]),
        # heartbeat_stale_s > heartbeat_interval_s (the rule that was already there)
        ({"heartbeat_stale_s": 0.1}, ["elastic_ft.heartbeat_stale_s (0.1)", "greater than",
                                      "elastic_ft.heartbeat_interval_s (0.1)"]),
    ],
)
def test_relations_are_refused_naming_both_keys_and_values(raw, fragments):
    with pytest.raises(ElasticFTConfigError) as err:
        ElasticFTConfig.from_dict(raw)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    "raw",
    [
        {"deadline_s": 0.11},
        {"warmup_deadline_s": 0},  # no deadline during warm-up, whatever the interval
        {"warmup_deadline_s": 0, "heartbeat_interval_s": 5.0, "deadline_s": 6.0,
         "heartbeat_stale_s": 10.0},
        {"warmup_deadline_s": 0.2},
        {"rebuild_budget_s": 3.5},
        {"rebuild_budget_s": 0.1, "join_window_s": 0},
    ],
)
def test_relations_accept_values_just_inside(raw):
    config = ElasticFTConfig.from_dict(raw)
    assert all(getattr(config, k) == v for k, v in raw.items())


def test_min_live_ranks_is_checked_against_the_dp_size():
    config = ElasticFTConfig.from_dict({"min_live_ranks": 5})
    with pytest.raises(ElasticFTConfigError) as err:
        config.check_for_world(data_parallel_size=2)
    for fragment in ["elastic_ft.min_live_ranks (5)", "at most", "data_parallel_size (2)"]:
        assert fragment in str(err.value)
    config.check_for_world(data_parallel_size=5)  # equal: never serve with a rank missing
    config.check_for_world(data_parallel_size=8)
    ElasticFTConfig().check_for_world(data_parallel_size=1)
