"""The availability planner: its limits, its comparisons, a Monte Carlo cross-check, the CLI."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from vllm_elastic_ft import planner
from vllm_elastic_ft.cli import main
from vllm_elastic_ft.planner import PlanInputError, PlanInputs, failure_window, plan_row


def _loss(inputs: PlanInputs, width: int, mode: str, groups: int = 1) -> float:
    return plan_row(inputs, width, groups, mode).goodput_loss


# --- limits -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", planner.MODES)
def test_no_failures_means_full_goodput(mode):
    never = PlanInputs(mtbf_s=1e300)  # a failure rate that rounds to nothing
    row = plan_row(never, 128, 16, mode)
    assert row.goodput == 1.0 and row.full_width_share == 1.0 and row.all_full_width_share == 1.0
    assert row.requests_lost_per_day < 1e-200


@pytest.mark.parametrize("mode", planner.MODES)
def test_free_recovery_means_full_goodput_at_any_rate(mode):
    free = PlanInputs(detect_s=0, recover_s=0, rejoin_s=0, admission_pause_s=0,
                      gang_restart_s=0, mtbf_s=10.0)
    row = plan_row(free, 64, 4, mode)
    assert row.goodput == 1.0 and row.full_width_share == 1.0


def test_deployment_goodput_depends_on_width_only():
    rows = planner.plan(PlanInputs())
    for mode in planner.MODES:
        for width in PlanInputs().widths:
            same = {r.goodput_loss for r in rows if r.mode == mode and r.width == width}
            assert len(same) == 1
    # ...while more groups mean more failures a day and a smaller share out per failure
    a, b = plan_row(PlanInputs(), 32, 2, "gang_restart"), plan_row(PlanInputs(), 32, 8, "gang_restart")
    assert b.failures_per_day == pytest.approx(4 * a.failures_per_day)
    assert b.capacity_out_per_failure == pytest.approx(a.capacity_out_per_failure / 4)
    assert b.all_full_width_share < a.all_full_width_share


# --- in-engine vs gang restart ------------------------------------------------------------

def test_in_engine_beats_gang_restart_whenever_its_recovery_costs_less():
    # "Recovery" here is all an in-engine recovery costs the group beyond detection:
    # recover + (1-p)*(pause + rejoin/W) + p*restart (a give-up pays its attempt, then the
    # restart). Whenever that is below the restart, in-engine wins, also at failure rates
    # high enough for the renewal denominator to matter (it cannot reverse the order: the
    # in-engine window is never shorter than its cost).
    rng = random.Random(7)
    checked = 0
    for _ in range(2000):
        inputs = PlanInputs(detect_s=rng.uniform(0, 5), recover_s=rng.uniform(0, 50),
                            rejoin_s=rng.uniform(0, 300), admission_pause_s=rng.uniform(0, 5),
                            gang_restart_s=rng.uniform(0, 300), giveup_prob=rng.uniform(0, 1),
                            mtbf_s=10 ** rng.uniform(3, 9))
        width = rng.choice((2, 8, 16, 128))
        p = inputs.giveup_prob
        recovery = (inputs.recover_s + (1 - p) * (inputs.admission_pause_s
                                                  + inputs.rejoin_s / width)
                    + p * inputs.gang_restart_s)
        ie, gang = _loss(inputs, width, "in_engine"), _loss(inputs, width, "gang_restart")
        if recovery < inputs.gang_restart_s:
            checked += 1
            assert ie < gang, inputs
    assert checked > 200


def test_in_engine_beats_gang_restart_at_the_drill_figures_and_their_ranges():
    for recover in (0.17, 0.3):
        for rejoin in (27.0, 41.0, 130.0):
            for restart in (104.0, 184.0):
                inputs = PlanInputs(recover_s=recover, rejoin_s=rejoin, gang_restart_s=restart)
                for width in inputs.widths:
                    ie = plan_row(inputs, width, 1, "in_engine")
                    gang = plan_row(inputs, width, 1, "gang_restart")
                    assert ie.goodput > gang.goodput
                    assert ie.requests_lost_per_failure == 0 < gang.requests_lost_per_failure


def test_the_planner_does_not_hide_a_rejoin_slower_than_a_restart():
    # A rejoin much slower than a gang restart keeps a narrow group at N-1 long enough to lose
    # more capacity than a restart would: the model says so rather than always favouring us.
    slow_rejoin = PlanInputs(rejoin_s=2000.0, gang_restart_s=150.0)
    assert _loss(slow_rejoin, 2, "in_engine") > _loss(slow_rejoin, 2, "gang_restart")
    assert (plan_row(slow_rejoin, 128, 1, "in_engine").full_width_share
            < plan_row(slow_rejoin, 128, 1, "gang_restart").full_width_share)


def test_giveup_probability_interpolates_to_a_gang_restart():
    base = PlanInputs()
    always = dataclasses.replace(base, giveup_prob=1.0)
    win = failure_window(always, 32, "in_engine")
    assert win.lost_s == pytest.approx(base.detect_s + base.recover_s + base.gang_restart_s)
    # the window's cost is the expectation over the two outcomes; the loss follows at low rates
    half = dataclasses.replace(base, giveup_prob=0.5)
    assert failure_window(half, 32, "in_engine").lost_s == pytest.approx(
        (failure_window(base, 32, "in_engine").lost_s + win.lost_s) / 2)
    assert _loss(half, 32, "in_engine") == pytest.approx(
        (_loss(base, 32, "in_engine") + _loss(always, 32, "in_engine")) / 2, rel=1e-3)


# --- scaling at small rates ---------------------------------------------------------------

def test_gang_restart_loss_is_linear_in_width_and_rate():
    base = PlanInputs()
    for width in (8, 16, 32, 64):
        assert _loss(base, 2 * width, "gang_restart") / _loss(base, width, "gang_restart") \
            == pytest.approx(2, rel=1e-3)
    faster = dataclasses.replace(base, mtbf_s=base.mtbf_s / 10)
    assert _loss(faster, 64, "gang_restart") / _loss(base, 64, "gang_restart") \
        == pytest.approx(10, rel=1e-3)
    # first order: lam * (detect + restart)
    assert _loss(base, 64, "gang_restart") == pytest.approx(
        64 / base.mtbf_s * (base.detect_s + base.gang_restart_s), rel=1e-3)


def test_in_engine_loss_is_affine_in_width_and_linear_in_rate():
    # lam*C = (W*(detect + recover + pause) + rejoin) / mtbf: the rejoin term does not grow
    # with W (one rank's share of a wider group is smaller, a wider group fails more often).
    base = PlanInputs()
    for width in base.widths:
        first_order = (width * (base.detect_s + base.recover_s + base.admission_pause_s)
                       + base.rejoin_s) / base.mtbf_s
        assert _loss(base, width, "in_engine") == pytest.approx(first_order, rel=1e-3)
    faster = dataclasses.replace(base, mtbf_s=base.mtbf_s / 10)
    assert _loss(faster, 32, "in_engine") / _loss(base, 32, "in_engine") \
        == pytest.approx(10, rel=1e-3)


def test_overlap_is_negligible_at_the_defaults():
    for row in planner.plan(PlanInputs()):
        assert row.overlap_probability < 2e-4


# --- Monte Carlo cross-check of the renewal formulas --------------------------------------

def _simulate(inputs: PlanInputs, width: int, mode: str, cycles: int, seed: int):
    """A group's up periods and failure windows drawn one by one: (loss, not-full share)."""
    rng = random.Random(seed)
    lam = width / inputs.mtbf_s
    d, r = inputs.detect_s, inputs.recover_s
    total = lost = degraded = 0.0
    for _ in range(cycles):
        total += rng.expovariate(lam)
        if mode == "gang_restart" or rng.random() < inputs.giveup_prob:
            window = d + (r if mode == "in_engine" else 0.0) + inputs.gang_restart_s
            cost = window
        else:
            zero = d + r + inputs.admission_pause_s
            window = zero + inputs.rejoin_s
            cost = zero + inputs.rejoin_s / width  # one rank's share missing while at N-1
        total += window
        lost += cost
        degraded += window
    return lost / total, degraded / total


@pytest.mark.parametrize("mode, giveup", [("in_engine", 0.0), ("in_engine", 0.3),
                                          ("gang_restart", 0.0)])
def test_monte_carlo_agrees_with_the_formulas(mode, giveup):
    # A high failure rate (lam*D ~ 0.1) so the renewal denominator matters and the
    # simulation's error (~1/sqrt(cycles)) is well below the effect.
    inputs = PlanInputs(mtbf_s=16 * 1500.0, giveup_prob=giveup)
    loss, not_full = _simulate(inputs, 16, mode, cycles=40000, seed=3)
    row = plan_row(inputs, 16, 1, mode)
    assert loss == pytest.approx(row.goodput_loss, rel=0.02)
    assert not_full == pytest.approx(1 - row.full_width_share, rel=0.02)


# --- input checks -------------------------------------------------------------------------

@pytest.mark.parametrize("change, fragments", [
    ({"mtbf_s": -1.0}, ["--mtbf-s", "> 0", "-1.0"]),
    ({"mtbf_s": 0.0}, ["--mtbf-s", "> 0"]),
    ({"mtbf_s": float("inf")}, ["--mtbf-s", "finite"]),
    ({"detect_s": float("nan")}, ["--detect-s", ">= 0"]),
    ({"rejoin_s": -5.0}, ["--rejoin-s", ">= 0"]),
    ({"giveup_prob": 1.5}, ["--giveup-prob", "[0, 1]"]),
    ({"inflight_per_group": -1.0}, ["--inflight-per-group", ">= 0"]),
    ({"widths": (8, 1)}, ["--widths", ">= 2", "[8, 1]"]),
    ({"widths": ()}, ["--widths", "one or more"]),
    ({"groups": (0,)}, ["--groups", ">= 1"]),
    ({"total_ranks": 96}, ["--total-ranks", "multiple", "[64, 128]"]),
    ({"total_ranks": 1}, ["--total-ranks", ">= 2"]),
])
def test_bad_inputs_are_named(change, fragments):
    with pytest.raises(PlanInputError) as err:
        planner.plan(dataclasses.replace(PlanInputs(), **change))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_fixed_total_gives_one_group_count_per_width():
    inputs = PlanInputs(total_ranks=128)
    assert inputs.validate().layouts() == [(8, 16), (16, 8), (32, 4), (64, 2), (128, 1)]
    assert {r.ranks for r in planner.plan(inputs)} == {128}


def test_inputs_say_where_they_come_from():
    described = PlanInputs(rejoin_s=27.0).described()
    assert "drills" in described["detect_s"]["source"]
    assert "Llama 3" in described["mtbf_s"]["source"] and "NOT measured" in described["mtbf_s"]["source"]
    assert described["rejoin_s"] == {"value": 27.0, "source": "given on the command line"}
    assert planner.LLAMA3_MTBF_S == pytest.approx(1.824e8, rel=1e-3)


# --- the CLI ------------------------------------------------------------------------------

def test_cli_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "sub" / "plan.json", tmp_path / "plan.png"
    assert main(["plan", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "gang_restart" in text and "in_engine" in text and "Llama 3" in text
    data = json.loads(out_json.read_text())
    assert len(data["rows"]) == 5 * 5 * 2
    assert data["inputs"]["mtbf_s"]["value"] == pytest.approx(planner.LLAMA3_MTBF_S)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, fragments", [
    (["--mtbf-s", "-3"], ["--mtbf-s", "> 0"]),
    (["--widths", "1", "8"], ["--widths", ">= 2"]),
    (["--giveup-prob", "2"], ["--giveup-prob", "[0, 1]"]),
    (["--total-ranks", "96", "--widths", "64"], ["--total-ranks", "multiple"]),
])
def test_cli_rejects_bad_input_before_writing_anything(tmp_path, capsys, argv, fragments):
    out_json, out_png = tmp_path / "plan.json", tmp_path / "plan.png"
    with pytest.raises(SystemExit) as exc:
        main(["plan", *argv, "--json", str(out_json), "--plot", str(out_png)])
    message = str(exc.value.code)
    assert message.startswith("plan: ")
    for fragment in fragments:
        assert fragment in message
    assert not out_json.exists() and not out_png.exists()
    assert capsys.readouterr().out == ""  # not even the table
