"""The plugin's one configuration object.

Every setting of vllm-elastic-ft lives in :class:`ElasticFTConfig`. It reaches
every vLLM process the same way, whatever the door:

* ``vllm serve ... --additional-config '{"elastic_ft": {...}}'``,
* ``vllm serve ... --elastic-ft-<key> VALUE`` flags that the plugin adds to the
  parser (folded into ``additional_config["elastic_ft"]``; a flag wins over the
  same key in ``--additional-config``),
* Ray Serve LLM ``engine_kwargs={"additional_config": {"elastic_ft": {...}}}``.

``additional_config`` is a real ``VllmConfig`` field, so vLLM ships it to every
engine-core and worker process; each process re-validates it with
:func:`ElasticFTConfig.from_additional_config`. Validation runs in the front
end before any model loads (see ``vllm/patches/api_server/engine_args.py``) and raises
:class:`ElasticFTConfigError` naming the key and the accepted values; the front end
then checks the settings that depend on the deployment's size
(:meth:`ElasticFTConfig.check_for_world`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

#: Key under ``additional_config`` that holds this plugin's settings.
CONFIG_KEY = "elastic_ft"

#: Accepted values of ``cpu_dispatch`` (see ``comm/cpu_collectives.py``).
CPU_DISPATCH_MODES = ("allgather", "all_to_all")


class ElasticFTConfigError(ValueError):
    """A bad ``elastic_ft`` setting. The message names the key and what is accepted."""


def _setting(default: Any, help: str, **limits: Any) -> Any:
    """A dataclass field carrying its help text and limits for validation and CLI flags."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass(frozen=True)
class ElasticFTConfig:
    """Settings of the vllm-elastic-ft plugin.

    Attributes are documented by their ``help`` metadata, which is also the
    help text of the matching ``--elastic-ft-<key>`` flag.
    """

    enabled: bool = _setting(
        True,
        "Master switch. false leaves vLLM exactly as stock (no patch is applied).",
    )
    cpu_expert_parallel: bool = _setting(
        True,
        "Give the CPU (gloo) communicator the variable-size all-gather / "
        "reduce-scatter that vLLM's allgather_reducescatter all2all needs, and make "
        "the CPU unquantized experts compute only this rank's experts.",
    )
    cpu_dispatch: str = _setting(
        "all_to_all",
        "How the CPU combine (reduce-scatterv) moves data: 'all_to_all' sends each "
        "rank only its rows, 'allgather' all-reduces the whole batch and slices.",
        choices=CPU_DISPATCH_MODES,
    )

    # Rank watchdog (watchdog/): deadlines around every dispatch and combine.
    watchdog: bool = _setting(
        True,
        "Arm a deadline around every MoE dispatch/combine, publish heartbeats and "
        "report faulty ranks (FaultReport).",
    )
    deadline_s: float = _setting(
        5.0,
        "Steady-state deadline of one dispatch or combine, in seconds.",
        min=0.1, max=3600.0,
    )
    warmup_calls: int = _setting(
        200,
        "At most this many guarded calls per rank get the warm-up deadline instead "
        "(profiling, compilation, warm-up dummy runs); the grace ends earlier, when the "
        "engine's warm-up is over: serving calls always get deadline_s.",
        min=0, max=10_000_000,
    )
    warmup_deadline_s: float = _setting(
        0.0,
        "Deadline during warm-up, in seconds; 0: the larger of 120 s and 10 x deadline_s "
        "(never unbounded).",
        min=0.0, max=3600.0,
    )
    heartbeat_interval_s: float = _setting(
        0.1,
        "How often each rank publishes its heartbeat and checks its peers, in seconds.",
        min=0.01, max=10.0,
    )
    heartbeat_stale_s: float = _setting(
        2.0,
        "A peer whose heartbeat is older than this is dead or hung (used where its "
        "process cannot be probed, i.e. on another host), in seconds.",
        min=0.05, max=3600.0,
    )
    watchdog_native: bool = _setting(
        True,
        "Use the native (C++) deadline monitor when it is built; false forces the "
        "pure-Python monitor.",
    )
    # In-engine recovery (vllm/worker_group.py, engine_group.py, frontend_recovery.py).
    in_engine_rebuild: bool = _setting(
        True,
        "Rebuild the DP group inside the running engines when a rank fails (survivors "
        "keep their processes, weights and KV cache; requests of the lost rank are "
        "re-submitted). false: a failure fences the group and the front end shuts "
        "down as stock vLLM does, for an orchestrator to restart it.",
    )
    join_window_s: float = _setting(
        3.0,
        "How long the first rank at a new epoch waits for the survivors it expects "
        "before it publishes the members without them, in seconds.",
        min=0.0, max=600.0,
    )
    # Group controller (group/): when a fenced group is given up on.
    rebuild_budget_s: float = _setting(
        30.0,
        "A group fenced or rebuilding for longer than this is FAILED (the orchestrator "
        "restarts it), in seconds.",
        min=0.1, max=3600.0,
    )
    max_rebuilds: int = _setting(
        3,
        "Rebuild attempts per fault (a fault during a rebuild is one more) before FAILED.",
        min=1, max=100,
    )
    min_live_ranks: int = _setting(
        1,
        "Fewer live ranks than this is FAILED instead of a rebuild.",
        min=1, max=100_000,
    )
    slow_strikes: int = _setting(
        3,
        "'slow' reports that fence the group (fewer leave it SUSPECT, still serving).",
        min=1, max=1000,
    )
    # Ray Serve rejoin (ray_serve/rejoin.py): a lost rank comes back in place.
    rejoin: bool = _setting(
        True,
        "Ray Serve: the replica of a lost rank starts a new engine for it and has the gang "
        "admit it at a new epoch (in place, no gang restart). false: the gang serves "
        "without that rank until Ray restarts the gang. (vllm serve: POST "
        "/elastic_ft/replace.)",
    )
    rejoin_attempts: int = _setting(
        3,
        "Ray Serve: rejoin attempts per lost rank; after a failed attempt the gang goes on "
        "serving without it.",
        min=0, max=100,
    )
    rejoin_timeout_s: float = _setting(
        300.0,
        "Ray Serve: one rejoin attempt (engine start-up, model load, admission) gives up "
        "after this many seconds.",
        min=1.0, max=3600.0,
    )
    fault_injection: bool = _setting(
        False,
        "Let drills and tests inject faults through the store (a per-call delay for a "
        "'slow' rank, a hold inside rebuilds). false: no injection key is ever read and "
        "no injection code runs on the serving path.",
    )
    store: str = _setting(
        "",
        "host:port of the TCPStore that carries heartbeats and fault reports; empty: "
        "the API server hosts one (set VLLM_ELASTIC_FT_STORE_HOST for multi-node).",
    )

    # ------------------------------------------------------------------ #
    # Construction and validation
    # ------------------------------------------------------------------ #
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ElasticFTConfig:
        """Validate ``raw`` (the ``elastic_ft`` dict) and build the config.

        Raises:
            ElasticFTConfigError: unknown key, wrong type or out-of-range value.
        """
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ElasticFTConfigError(
                f"additional_config.{CONFIG_KEY} must be a JSON object with keys "
                f"{list(cls.keys())}, got {type(raw).__name__}: {raw!r}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in fields:
                raise ElasticFTConfigError(
                    f"unknown key {CONFIG_KEY}.{key!r}; accepted keys: "
                    f"{sorted(fields)}"
                )
            values[key] = _check_value(fields[key], value)
        config = cls(**values)
        config._check_relations()
        return config

    def _check_relations(self) -> None:
        """Checks that involve two keys."""
        if self.heartbeat_stale_s <= self.heartbeat_interval_s:
            raise ElasticFTConfigError(
                f"{CONFIG_KEY}.heartbeat_stale_s ({self.heartbeat_stale_s}) must be greater "
                f"than {CONFIG_KEY}.heartbeat_interval_s ({self.heartbeat_interval_s})"
            )
        # A missed deadline is judged from the peers' heartbeats, published once per
        # heartbeat period (their call counts lag by up to one period): a deadline not
        # longer than that period is missed before the heartbeats can show which rank
        # is behind, so healthy peers would look late.
        if self.deadline_s <= self.heartbeat_interval_s:
            raise ElasticFTConfigError(
                f"{CONFIG_KEY}.deadline_s ({self.deadline_s}) must be greater than "
                f"{CONFIG_KEY}.heartbeat_interval_s ({self.heartbeat_interval_s}): a deadline "
                f"not longer than the heartbeat period cannot be watched"
            )
        if self.warmup_deadline_s != 0 and self.warmup_deadline_s <= self.heartbeat_interval_s:
            raise ElasticFTConfigError(
                f"{CONFIG_KEY}.warmup_deadline_s ({self.warmup_deadline_s}) must be 0 (no "
                f"deadline) or greater than {CONFIG_KEY}.heartbeat_interval_s "
                f"({self.heartbeat_interval_s}): a deadline not longer than the heartbeat "
                f"period cannot be watched"
            )
        # The first rank at a new epoch waits up to join_window_s for the survivors it
        # expects before it publishes the members; the others wait for that at most
        # rebuild_budget_s (group/membership.py agree). With a budget not longer than the
        # window, a rebuild whose expected survivor never registers times out before the
        # members are published: the rebuild fails instead of going on without it.
        if self.rebuild_budget_s <= self.join_window_s:
            raise ElasticFTConfigError(
                f"{CONFIG_KEY}.rebuild_budget_s ({self.rebuild_budget_s}) must be greater "
                f"than {CONFIG_KEY}.join_window_s ({self.join_window_s}): an agreement's "
                f"join window must fit inside the rebuild budget"
            )
        if self.store and not _is_host_port(self.store):
            raise ElasticFTConfigError(
                f"{CONFIG_KEY}.store must be 'host:port' or empty, got {self.store!r}"
            )

    def check_for_world(self, data_parallel_size: int) -> None:
        """Checks against the deployment's DP size, which the config alone does not know.

        Called by the front end (API server, Ray Serve builder) once the DP size is
        known and before any engine starts.

        Raises:
            ElasticFTConfigError: ``min_live_ranks`` greater than ``data_parallel_size``.
        """
        # A group never has more live ranks than DP ranks: with a larger minimum its
        # first fault (or a rank's rejoin) would end it FAILED instead of a rebuild,
        # long after start-up. Equal is accepted: "never serve with a rank missing".
        if self.min_live_ranks > data_parallel_size:
            raise ElasticFTConfigError(
                f"{CONFIG_KEY}.min_live_ranks ({self.min_live_ranks}) must be at most "
                f"data_parallel_size ({data_parallel_size}): the group can never have more "
                f"live ranks than it has DP ranks"
            )

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None
    ) -> ElasticFTConfig:
        """The config carried in a ``VllmConfig.additional_config`` dict."""
        return cls.from_dict((additional_config or {}).get(CONFIG_KEY))

    def controller_options(self):
        """The group controller's options (``group.state_machine.ControllerOptions``)."""
        from vllm_elastic_ft.group.state_machine import ControllerOptions

        return ControllerOptions(rebuild_budget_s=self.rebuild_budget_s,
                                 max_rebuilds=self.max_rebuilds,
                                 min_live_ranks=self.min_live_ranks,
                                 slow_strikes=self.slow_strikes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _check_value(f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and limits; return it normalised."""
    name = f"{CONFIG_KEY}.{f.name}"
    kind = type(f.default)
    low, high = f.metadata.get("min"), f.metadata.get("max")
    # bool is a subclass of int: check it first and strictly.
    if kind is bool:
        if not isinstance(value, bool):
            raise ElasticFTConfigError(
                f"{name} must be true or false, got {value!r}"
            )
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ElasticFTConfigError(f"{name} must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float is out of any range
            raise ElasticFTConfigError(
                f"{name} must be a finite number in [{low}, {high}], got {value!r}"
            ) from None
        # NaN compares False with both limits, so the range check below would let it
        # through (and every deadline compared with it would never fire): refuse
        # NaN and +/-inf here, whatever the limits.
        if not math.isfinite(value):
            raise ElasticFTConfigError(
                f"{name} must be a finite number in [{low}, {high}], got {value!r}"
            )
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ElasticFTConfigError(f"{name} must be an integer, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ElasticFTConfigError(f"{name} must be a string, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ElasticFTConfigError(
            f"{name} must be one of {list(choices)}, got {value!r}"
        )
    if low is not None and value < low or high is not None and value > high:
        raise ElasticFTConfigError(
            f"{name} must be in [{low}, {high}], got {value!r}"
        )
    return value
