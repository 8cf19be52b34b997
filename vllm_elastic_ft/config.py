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
end before any model loads (see ``vllm/patches/engine_args.py``) and raises
:class:`ElasticFTConfigError` naming the key and the accepted values.
"""

from __future__ import annotations

import dataclasses
import json
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
        return cls(**values)

    @classmethod
    def from_additional_config(
        cls, additional_config: Mapping[str, Any] | None
    ) -> ElasticFTConfig:
        """The config carried in a ``VllmConfig.additional_config`` dict."""
        return cls.from_dict((additional_config or {}).get(CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_value(f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and limits; return it normalised."""
    name = f"{CONFIG_KEY}.{f.name}"
    kind = type(f.default)
    # bool is a subclass of int: check it first and strictly.
    if kind is bool:
        if not isinstance(value, bool):
            raise ElasticFTConfigError(
                f"{name} must be true or false, got {value!r}"
            )
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ElasticFTConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
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
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and value < low or high is not None and value > high:
        raise ElasticFTConfigError(
            f"{name} must be in [{low}, {high}], got {value!r}"
        )
    return value
