"""Availability planner (``vllm-elastic-ft plan``): what rank failures cost a WideEP deployment.

A deployment is ``G`` DP groups ("gangs" in Ray Serve LLM) of ``W`` ranks each, ``R = G*W``
ranks in all. Ray Serve LLM's own argument for many groups is the blast radius: a group is
restarted as a unit when one of its ranks fails while the other groups keep serving, so a
failure takes out ``1/G`` of the capacity for a whole restart, and a wider group fails more
often. This module puts numbers on that trade-off for two recoveries:

``in_engine`` (this plugin): the survivors fence, rebuild and serve at ``W-1``; the lost rank
    rejoins in place later. ``gang_restart`` (Ray Serve's stock recovery): the whole group is
    torn down and started again and serves nothing meanwhile.

Model (analytic; ``tests/test_planner.py`` checks it against a small Monte Carlo):

- Every rank fails as a Poisson process of rate ``1/mtbf_s``, independently, so a group sees
  failures at ``lam = W / mtbf_s`` per second.
- One failure opens a *window* of mean length ``D`` that costs ``C`` capacity-seconds (seconds
  of the whole group's service) and ``Z`` seconds at zero capacity:

  in_engine, recovery succeeds (probability ``1 - p``, ``p = giveup_prob``)::

      Z = detect + recover + admission_pause          # fenced, then the rejoin's pause
      D = Z + rejoin                                   # not at full width
      C = Z + rejoin / W                               # at N-1 an MoE group still holds every
                                                       # expert; it loses about one rank's share

  in_engine, recovery gives up (probability ``p``; the orchestrator restarts the gang)::

      Z = D = C = detect + recover + gang_restart

  gang_restart::

      Z = D = C = detect + gang_restart

- Renewal approximation: the group alternates between an up period (exponential, mean
  ``1/lam``) and one failure's window; a further failure *inside* a window is not modelled
  (for a gang restart it is absorbed anyway, the group is being restarted). Long-run shares::

      goodput        = 1 - lam*C / (1 + lam*D)        (~ 1 - lam*C to first order)
      at full width  = 1 / (1 + lam*D)                (~ 1 - lam*D)
      group at zero  = lam*Z / (1 + lam*D)

  The neglected overlap has probability ``P_overlap = 1 - exp(-lam_w * D)`` per failure
  (``lam_w`` the rate of the ranks still up in the window: ``(W-1)/mtbf_s`` in engine,
  ``W/mtbf_s`` for a restart), so the figures are good to a relative ``O(P_overlap)``;
  the table prints it (about 1e-4 at the defaults: negligible).
- Groups fail independently and carry equal load, so the deployment's goodput is a group's
  (it depends on ``W`` only), while ``G`` sets how much capacity one failure takes out
  (``1/G``), the share of time with *every* group at full width (``full**G``) and the share
  with *no* group serving (``zero**G``: a single group, ``G = 1``, is an outage each time).
- Requests lost per failure: none in engine (the survivors and the front ends finish them;
  also when the plugin gives up, the adapter's router holds requests while Ray restarts the
  gang: 0 of 400 lost in ``ray-drill``'s ``gang_restart`` mode); ``inflight_per_group`` with
  stock Ray Serve's gang restart. That is a lower bound: stock Ray also kept routing new
  requests to the broken gang until its health check failed (260 of 400 failed in the drill).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("in_engine", "gang_restart")
DAY_S = 86400.0

# The per-rank failure rate is not something a 2-core CPU host can measure. Public figure:
# Meta's Llama 3 report (2024) counts 419 unexpected interruptions in a 54-day snapshot on
# 16,384 H100 GPUs (GPUs, HBM, hosts, network, software together), i.e. one interruption per
# GPU slot every 16384*54*86400/419 s = 1.8e8 s = 5.8 years. Anything that takes a rank out
# counts for a serving group, so the total, not the GPU-only share, is the figure to use.
LLAMA3_MTBF_S = 16384 * 54 * DAY_S / 419

# Where each default comes from (printed with the table; JSON "inputs"). The drills ran on a
# 2-core CPU host with the tiny MoE; see README "Ray Serve LLM" and "Benchmarks".
SOURCES: dict[str, str] = {
    "detect_s": "drills: kill -> FaultReport, 0.008-0.23 s (typical 0.02 s)",
    "recover_s": "drills: fence -> serving again at N-1, 0.17-0.3 s",
    "rejoin_s": "ray-drill: lost rank back in place, 41-130 s (vllm serve: ~27 s engine start)",
    "admission_pause_s": "drills: admission pauses the whole group 0.07-0.13 s",
    "gang_restart_s": "ray-drill: Ray Serve's gang restart, kill -> serving, 104-184 s",
    "giveup_prob": "assumption: in-engine recovery never gave up in the drills",
    "mtbf_s": "NOT measured here: Meta Llama 3 report, 419 unexpected interruptions in "
              "54 days on 16,384 GPUs (per-GPU MTBF 5.8 years)",
    "inflight_per_group": "ray-drill: 8 requests in flight",
}


_SECONDS = ("detect_s", "recover_s", "rejoin_s", "admission_pause_s", "gang_restart_s")


class PlanInputError(ValueError):
    """Bad planner input; the message names the flag and what it accepts."""


@dataclass(frozen=True)
class PlanInputs:
    """The planner's inputs; every default is a drill's figure except ``mtbf_s``."""

    detect_s: float = 0.02
    recover_s: float = 0.3
    rejoin_s: float = 60.0
    admission_pause_s: float = 0.1
    gang_restart_s: float = 150.0
    giveup_prob: float = 0.0
    mtbf_s: float = LLAMA3_MTBF_S
    inflight_per_group: float = 8.0
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    groups: tuple[int, ...] = (1, 2, 4, 8, 16)
    # With a fixed total, each width gets G = total_ranks / W groups instead of ``groups``.
    total_ranks: int | None = None

    def validate(self) -> "PlanInputs":
        for name in _SECONDS:
            _check_number(name, getattr(self, name), "a finite number of seconds >= 0",
                          lambda v: v >= 0)
        _check_number("mtbf_s", self.mtbf_s, "a finite number of seconds > 0", lambda v: v > 0)
        _check_number("giveup_prob", self.giveup_prob, "a probability in [0, 1]",
                      lambda v: 0 <= v <= 1)
        _check_number("inflight_per_group", self.inflight_per_group, "a finite number >= 0",
                      lambda v: v >= 0)
        # Width 1 has no N-1 to fall back to: the in-engine path needs a survivor.
        _check_ints("widths", self.widths, 2, "integers >= 2 (a group needs a survivor)")
        if self.total_ranks is None:
            _check_ints("groups", self.groups, 1, "integers >= 1")
            return self
        if isinstance(self.total_ranks, bool) or not isinstance(self.total_ranks, int) \
                or self.total_ranks < 2:
            raise PlanInputError(f"--total-ranks: accepted: an integer >= 2; got "
                                 f"{self.total_ranks!r}")
        bad = [w for w in self.widths if self.total_ranks % w]
        if bad:
            raise PlanInputError(f"--total-ranks: accepted: a multiple of every width in "
                                 f"--widths; {self.total_ranks} is not a multiple of {bad}")
        return self

    def layouts(self) -> list[tuple[int, int]]:
        """(width, groups) pairs, by width then group count."""
        if self.total_ranks is not None:
            return [(w, self.total_ranks // w) for w in self.widths]
        return [(w, g) for w in self.widths for g in self.groups]

    def described(self) -> dict[str, dict[str, Any]]:
        """Each scalar input with its value and where it comes from."""
        defaults = PlanInputs()
        out = {}
        for name in SOURCES:
            value = getattr(self, name)
            given = value != getattr(defaults, name)
            out[name] = {"value": value,
                         "source": "given on the command line" if given else SOURCES[name]}
        return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(name: str, value: Any, accepted: str, ok) -> None:
    good = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and ok(value))
    if not good:
        raise PlanInputError(f"{_flag(name)}: accepted: {accepted}; got {value!r}")


def _check_ints(name: str, values: Any, low: int, accepted: str) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low
                         for v in values):
        raise PlanInputError(f"{_flag(name)}: accepted: one or more {accepted}; "
                             f"got {list(values) if values else values!r}")


@dataclass(frozen=True)
class Window:
    """One failure's expected cost to its group: see the module docstring."""

    zero_s: float      # Z: seconds at zero capacity
    degraded_s: float  # D: seconds not at full width (Z included)
    lost_s: float      # C: capacity-seconds lost
    requests_lost: float


def failure_window(inputs: PlanInputs, width: int, mode: str) -> Window:
    d, r = inputs.detect_s, inputs.recover_s
    if mode == "gang_restart":
        t = d + inputs.gang_restart_s
        return Window(t, t, t, inputs.inflight_per_group)
    if mode != "in_engine":
        raise PlanInputError(f"mode: accepted: {', '.join(MODES)}; got {mode!r}")
    p = inputs.giveup_prob
    zero_ok = d + r + inputs.admission_pause_s
    ok = Window(zero_ok, zero_ok + inputs.rejoin_s, zero_ok + inputs.rejoin_s / width, 0.0)
    gave_up = d + r + inputs.gang_restart_s
    # Expected value over the two outcomes (each term is linear in the window's cost).
    return Window(*((1 - p) * a + p * gave_up for a in (ok.zero_s, ok.degraded_s, ok.lost_s)),
                  requests_lost=0.0)


@dataclass(frozen=True)
class PlanRow:
    width: int
    groups: int
    ranks: int
    mode: str
    failures_per_day: float       # whole deployment
    goodput: float                # fraction of the no-fault capacity
    goodput_loss: float           # 1 - goodput, computed directly (no cancellation)
    full_width_share: float       # one group
    all_full_width_share: float   # every group at once
    no_service_share: float       # every group at zero at once (groups independent)
    no_service_minutes_per_year: float
    capacity_out_per_failure: float  # share of the deployment's capacity, worst phase
    requests_lost_per_failure: float
    requests_lost_per_day: float
    overlap_probability: float    # per failure: another rank of the group fails in the window


def plan_row(inputs: PlanInputs, width: int, groups: int, mode: str) -> PlanRow:
    lam = width / inputs.mtbf_s
    win = failure_window(inputs, width, mode)
    denom = 1.0 + lam * win.degraded_s
    loss = lam * win.lost_s / denom
    full = 1.0 / denom
    zero = lam * win.zero_s / denom
    survivors = width - 1 if mode == "in_engine" else width
    per_day = width * groups * DAY_S / inputs.mtbf_s
    return PlanRow(
        width=width, groups=groups, ranks=width * groups, mode=mode,
        failures_per_day=per_day, goodput=1.0 - loss, goodput_loss=loss,
        full_width_share=full, all_full_width_share=full ** groups,
        no_service_share=zero ** groups,
        no_service_minutes_per_year=zero ** groups * 365 * DAY_S / 60,
        capacity_out_per_failure=1.0 / groups,
        requests_lost_per_failure=win.requests_lost,
        requests_lost_per_day=per_day * win.requests_lost,
        overlap_probability=-math.expm1(-survivors / inputs.mtbf_s * win.degraded_s),
    )


def plan(inputs: PlanInputs) -> list[PlanRow]:
    inputs.validate()
    return [plan_row(inputs, w, g, m) for w, g in inputs.layouts() for m in MODES]


_COLUMNS = (  # header, width, format
    ("width", 5, "{:d}"), ("groups", 6, "{:d}"), ("ranks", 5, "{:d}"), ("mode", 12, "{}"),
    ("fail/day", 8, "{:.3f}"), ("goodput", 9, "{:.7f}"), ("1-goodput", 9, "{:.2e}"),
    ("full width", 10, "{:.7f}"), ("all full", 8, "{:.5f}"), ("down min/y", 10, "{:.2g}"),
    ("out/fail", 8, "{:.3f}"), ("lost/fail", 9, "{:g}"), ("lost/day", 8, "{:.3f}"),
    ("P(overlap)", 10, "{:.1e}"),
)
_FIELDS = ("width", "groups", "ranks", "mode", "failures_per_day", "goodput", "goodput_loss",
           "full_width_share", "all_full_width_share", "no_service_minutes_per_year",
           "capacity_out_per_failure", "requests_lost_per_failure", "requests_lost_per_day",
           "overlap_probability")


def format_table(inputs: PlanInputs, rows: list[PlanRow]) -> str:
    lines = ["inputs (defaults are this project's drill figures, 2-core CPU host, tiny MoE; "
             "mtbf_s is a public figure):"]
    for name, item in inputs.described().items():
        lines.append(f"  {_flag(name):22} {item['value']:<12.6g} {item['source']}")
    lines.append("")
    lines.append("  ".join(h.rjust(w) for h, w, _ in _COLUMNS))
    previous = None
    for row in rows:
        if previous is not None and row.width != previous:
            lines.append("")
        previous = row.width
        cells = [getattr(row, f) for f in _FIELDS]
        lines.append("  ".join(fmt.format(c).rjust(w) for c, (_, w, fmt) in zip(cells, _COLUMNS)))
    lines += [
        "",
        "fail/day: rank failures of the whole deployment; goodput: share of the no-fault "
        "capacity served (depends on W only);",
        "full width: share of time a group has all W ranks; all full: every group at once; "
        "down min/y: minutes a year no group serves",
        "(groups independent); out/fail: share of the capacity one failure takes out at its "
        "worst; lost/fail, lost/day: requests lost",
        "(stock gang restart: the group's in-flight requests, a lower bound); P(overlap): "
        "another failure inside a window (neglected).",
    ]
    return "\n".join(lines) + "\n"


def to_json(inputs: PlanInputs, rows: list[PlanRow]) -> dict[str, Any]:
    return {
        "inputs": inputs.described(),
        "widths": list(inputs.widths),
        "groups": list(inputs.groups) if inputs.total_ranks is None else None,
        "total_ranks": inputs.total_ranks,
        "model": "renewal: goodput = 1 - lam*C/(1+lam*D), lam = W/mtbf_s; see "
                 "vllm_elastic_ft/planner.py",
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def write_json(path: str | Path, inputs: PlanInputs, rows: list[PlanRow]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_json(inputs, rows), indent=2) + "\n")


def write_plot(path: str | Path, inputs: PlanInputs, rows: list[PlanRow]) -> None:
    """Left: 1 - goodput vs width per mode. Right: share of time some group is below full
    width vs width, per mode and group count (where ``G`` matters)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; this must precede pyplot
    import matplotlib.pyplot as plt

    style = {"in_engine": ("tab:blue", "-", "in-engine recovery + rejoin"),
             "gang_restart": ("tab:red", "--", "gang restart (Ray Serve stock)")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for mode, (color, ls, label) in style.items():
        per_width = {r.width: r.goodput_loss for r in rows if r.mode == mode}
        xs = sorted(per_width)
        left.plot(xs, [per_width[x] for x in xs], ls, color=color, marker="o", label=label)
    group_counts = sorted({r.groups for r in rows})
    shades = plt.get_cmap("viridis")
    for i, g in enumerate(group_counts):
        shade = shades(i / max(1, len(group_counts) - 1) * 0.85)
        for mode, (_, ls, _) in style.items():
            sel = sorted((r.width, 1 - r.all_full_width_share) for r in rows
                         if r.mode == mode and r.groups == g)
            right.plot([s[0] for s in sel], [s[1] for s in sel], ls, color=shade, marker=".",
                       label=f"G={g} {'in-engine' if mode == 'in_engine' else 'gang restart'}")
    mtbf_years = inputs.mtbf_s / (365 * DAY_S)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(inputs.widths), [str(w) for w in inputs.widths])
        ax.set_xlabel("group width W (ranks per DP group)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("goodput loss (1 - goodput)")
    left.set_title(f"capacity lost to rank failures, any G (per-rank MTBF {mtbf_years:.1f} y)")
    left.legend()
    right.set_ylabel("share of time some group is below full width")
    right.set_title("G groups: 1 - (group's share at full width)^G")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
