"""Run configuration: one frozen dataclass per component, loaded from TOML; errors name the offending key.

The same configuration travels three ways: a TOML file (``securemark simulate``), ``--set section.key=value``
overrides, and Flower's flat run config (``[tool.flwr.app.config]`` keys such as ``train.rounds``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

DATASET_NAMES = ("digits", "mnist5k", "synthetic", "mnist", "fashion-mnist", "cifar10")  # see securemark.data


class ConfigError(ValueError):
    """A configuration key is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | mnist5k | synthetic (offline); mnist | fashion-mnist | cifar10 (flwr-datasets)
    files: str = ""  # for the flwr-datasets sets: local parquet file(s) instead of the Hugging Face hub
    partition: str = "iid"  # iid | dirichlet | pathological
    alpha: float = 0.5  # Dirichlet concentration
    classes_per_client: int = 2  # pathological partitions
    test_fraction: float = 0.2  # held out on the server for evaluation


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"  # mlp | cnn | cifar-cnn
    width: int = 0  # mlp hidden units, cnn base channels; 0 = the model's default


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = 2
    clients: int = 4  # federation size: one customer per client (partition)
    per_round: int = 4  # clients sampled each round
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class FingerprintConfig:
    enabled: bool = True
    code: str = "tardos"
    length: int = 256
    max_colluders: int = 3
    eps: float = 1e-3
    budget: float = 0.05  # perturbation RMS / carrier RMS
    eval_copies: int = 3  # fingerprinted copies evaluated per round


@dataclass(frozen=True)
class SecAggSettings:
    enabled: bool = True
    graph: str = "complete"  # complete (SecAgg) | sparse (SecAgg+)
    clip: float = 0.5  # update values are clipped to [-clip, clip] before quantization
    bits: int = 16
    dropout: float = 0.0  # simulated: probability that a client's message is lost at each stage
    timeout: float = 300.0  # seconds to wait for replies in each stage


@dataclass(frozen=True)
class ResourcesConfig:
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractions share a GPU between Ray actors


class TomlConfig:
    """Loading shared by every top-level config: TOML file, ``--set`` overrides, nested sections, checked types."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for key, value in raw.items():
            if key not in hints:
                raise ConfigError(f"unknown configuration section or key {key!r}")
            if dataclasses.is_dataclass(hints[key]):
                if not isinstance(value, dict):
                    raise ConfigError(f"[{key}] must be a table")
                kwargs[key] = _section(hints[key], key, value)
            else:
                kwargs[key] = _coerce(f"{key}", hints[key], value)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> Any:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects section.key=value, got {item!r}")
            _assign(raw, key.strip(), _parse_value(value.strip()))
        return cls.from_dict(raw)

    def to_toml(self) -> str:
        lines, tables = [], []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                tables.append(f"\n[{f.name}]")
                tables += [f"{s.name} = {_toml_value(getattr(value, s.name))}" for s in fields(value)]
            elif isinstance(value, dict):
                tables.append(f"\n[{f.name}]")
                tables += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines + tables) + "\n"


@dataclass(frozen=True)
class SimConfig(TomlConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: str = "runs/latest"

    def __post_init__(self) -> None:
        _check(self.data.name in DATASET_NAMES, "data.name", self.data.name)
        _check(self.data.partition in ("iid", "dirichlet", "pathological"), "data.partition", self.data.partition)
        _check(0 < self.data.test_fraction < 1, "data.test_fraction", self.data.test_fraction)
        _check(self.model.name in ("mlp", "cnn", "cifar-cnn"), "model.name", self.model.name)
        _check(self.model.width >= 0, "model.width", self.model.width)
        t = self.train
        _check(t.rounds >= 1, "train.rounds", t.rounds)
        _check(t.clients >= 1, "train.clients", t.clients)
        _check(1 <= t.per_round <= t.clients, "train.per_round", t.per_round)
        _check(t.local_epochs >= 1 and t.lr > 0 and t.batch_size >= 1, "train.local_epochs/lr/batch_size", t)
        _check(self.secagg.graph in ("complete", "sparse"), "secagg.graph", self.secagg.graph)
        _check(0 <= self.secagg.dropout < 1, "secagg.dropout", self.secagg.dropout)
        _check(
            not self.secagg.enabled or t.per_round >= 3, "train.per_round (masked aggregation needs >= 3)", t.per_round
        )
        _check(self.resources.num_cpus > 0 and self.resources.num_gpus >= 0, "resources", self.resources)

    # --- Flower's flat run config -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SimConfig:
        return super().from_dict(raw)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> SimConfig:
        return super().load(path, overrides)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> SimConfig:
        """From Flower's flat run config: {"train.rounds": 2, ...}."""
        raw: dict[str, Any] = {}
        for key, value in flat.items():
            _assign(raw, key, value)
        return cls.from_dict(raw)

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in fields(value):
                    out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
            else:
                out[f.name] = value
        return out


def _check(ok: bool, key: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"invalid value for {key}: {value!r}")


def _section(cls: type, name: str, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {name}.{key}; known: {', '.join(hints)}")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, typ: Any, value: Any) -> Any:
    origin, args = get_origin(typ), get_args(typ)
    if origin is tuple and isinstance(value, list | tuple):  # tuple[X, ...] from a TOML array
        return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if origin is dict and isinstance(value, dict):  # dict[str, X] from a TOML table
        return {str(k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif typ is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be of type {getattr(typ, '__name__', typ)}, got {value!r}")


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {p} is not a table")
    node[parts[-1]] = value


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
