"""Run configuration: one frozen dataclass per component, loaded from TOML; errors name the offending key.

The same configuration travels three ways: a TOML file (``securemark simulate``), ``--set section.key=value``
overrides, and Flower's flat run config (``[tool.flwr.app.config]`` keys such as ``train.rounds``).

Relative paths written in a TOML file resolve against that file's folder, so a config means the same from any
working directory; paths given with ``--set`` or in Flower's run config resolve against the working directory.
Every value is range-checked when the config is built; the error names the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from securemark.codes.base import CODE_KINDS
from securemark.errors import SecureMarkError

DATASET_NAMES = ("digits", "digits-rgb", "mnist5k", "synthetic", "mnist", "fashion-mnist", "cifar10")  # securemark.data
# securemark.models: its own three, then the corpus of users' architectures (securemark.corpus, small sizes)
MODEL_NAMES = ("mlp", "cnn", "cifar-cnn", "resnet18", "resnet8", "cifar-resnet18", "preact-resnet18", "vgg11-bn",
               "mobilenet-v2", "vit-tiny", "flower-net")  # fmt: skip
MAX_CLIENTS = 100_000  # one customer, one code row and one key pair per client; beyond this, shard the run


class ConfigError(SecureMarkError, ValueError):
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
    function_budget: float = 0.03  # black-box mark: its RMS / the centred logits' RMS (0: copies carry none)
    # the run's initial model's copies (round 1 of a fresh run) carry the function mark too: for a pretrained
    # initial model. Off by default: an untrained model's features are rewritten by the first round, and a head
    # edited for them set round 1 back (a ResNet-8: 0.36 against 0.80 with the white-box mark alone)
    function_initial: bool = False
    eval_copies: int = 3  # fingerprinted copies evaluated per round
    # who a customer is: auto (partition ids in a simulation; a deployment stops until it says one of the
    # others) | partition-id (what a node claims: anyone can) | node (its key registered on an authenticating
    # SuperLink)
    identity: str = "auto"
    # every round's model is a base (its projection, 8 bytes x L); the model file itself is kept for the
    # first and then every anchor_every-th (1: every one): what the tracer aligns suspects to
    anchor_every: int = 16


THREATS = ("semi-honest", "malicious")


@dataclass(frozen=True)
class SecAggSettings:
    enabled: bool = True
    graph: str = "complete"  # complete (SecAgg) | sparse (SecAgg+)
    # the smallest quantization range: each floating tensor's is max(clip, 16 x its largest |value|), 4x wider
    # after each round that clipped it, 256 x clip at least in the first round (securemark.secagg.ranges)
    clip: float = 8.0
    bits: int = 32  # most quantization bits a value gets (step 2 x range / (2^bits - 1)): securemark.secagg.ranges
    dropout: float = 0.0  # simulated: probability that a client's message is lost at each stage
    timeout: float = 300.0  # longest wait for the replies of one stage (seconds)
    grace: float = 10.0  # once the threshold has answered, how much longer a stage waits for the rest (seconds)
    # nodes take part in fixed groups of this many or more, and only whole groups are summed: over any number of
    # rounds of one model for all, the server learns at most a group's sums (securemark.secagg.groups)
    group: int = 1
    # semi-honest: the server follows the protocol (two exchanges a round). malicious: nodes sign their keys and,
    # in a third exchange, the survivor list and configuration; none reveals without enough matching signatures
    # (securemark.secagg.protocol.signing)
    threat: str = "semi-honest"
    # the roster of the nodes' signing keys (malicious threat): every node holds it from the owner; "" in a
    # simulation makes one for its simulated nodes
    roster: str = ""
    signers: float = 2 / 3  # share of a round's nodes whose signatures a node needs before it reveals (2/3..1)


@dataclass(frozen=True)
class ResourcesConfig:
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractions share a GPU between Ray actors
    # "" starts a private Ray instance on this machine; "auto", "host:port" or "ray://host:port" joins a running
    # cluster (its nodes need securemark installed; the run's outputs are written where the ServerApp runs)
    ray_address: str = ""


class TomlConfig:
    """Loading shared by every top-level config: TOML file, ``--set`` overrides, nested sections, checked types."""

    PATHS: ClassVar[tuple[str, ...]] = ()  # dotted keys holding paths (resolved against the file's folder)

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
        except UnicodeDecodeError:  # the decoder's message would quote a byte of the file (a key, say)
            raise ConfigError(f"{path} is not a UTF-8 text file (a TOML config is)") from None
        _resolve_paths(raw, cls.PATHS, Path(path).resolve().parent)
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects section.key=value, got {item!r}")
            _assign(raw, key.strip(), _parse_value(value.strip()))
        return cls.from_dict(raw)

    def to_toml(self, folder: str | Path | None = None) -> str:
        """TOML that loads back to this config. Written for a file in ``folder``, its paths are made relative
        to that folder: the file stays right when the tree moves, and names nobody's home directory."""
        raw = dataclasses.asdict(self)  # type: ignore[call-overload]
        if folder is not None:
            _relative_paths(raw, self.PATHS, Path(folder))
        lines, tables = [], []
        for key, value in raw.items():
            if isinstance(value, dict):
                tables.append(f"\n[{key}]")
                tables += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines + tables) + "\n"


@dataclass(frozen=True)
class SimConfig(TomlConfig):
    PATHS: ClassVar[tuple[str, ...]] = ("output", "data.files", "secagg.roster")

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: str = "runs/latest"

    def __post_init__(self) -> None:
        d, m, t, f, s, r = self.data, self.model, self.train, self.fingerprint, self.secagg, self.resources
        _check(d.name in DATASET_NAMES, "data.name", d.name)
        _check(d.partition in ("iid", "dirichlet", "pathological"), "data.partition", d.partition)
        _check(_finite(d.alpha) and d.alpha > 0, "data.alpha", d.alpha)
        _check(1 <= d.classes_per_client <= 1000, "data.classes_per_client", d.classes_per_client)
        _check(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction)
        _check(m.name in MODEL_NAMES, "model.name", m.name)
        _check(0 <= m.width <= 65536, "model.width", m.width)
        _check(1 <= t.rounds <= 100_000, "train.rounds", t.rounds)
        _check(1 <= t.clients <= MAX_CLIENTS, f"train.clients (1..{MAX_CLIENTS})", t.clients)
        _check(1 <= t.per_round <= t.clients, "train.per_round (1..train.clients)", t.per_round)
        _check(1 <= t.local_epochs <= 10_000, "train.local_epochs", t.local_epochs)
        _check(_finite(t.lr) and 0 < t.lr <= 1e3, "train.lr", t.lr)
        _check(1 <= t.batch_size <= 1 << 20, "train.batch_size", t.batch_size)
        _check(0 <= t.seed < 1 << 63, "train.seed", t.seed)
        _check(f.code in CODE_KINDS, f"fingerprint.code (one of {', '.join(CODE_KINDS)})", f.code)
        _check(16 <= f.length <= 1 << 20, "fingerprint.length (16..2^20)", f.length)
        _check(1 <= f.max_colluders <= 1000, "fingerprint.max_colluders", f.max_colluders)
        _check(_finite(f.eps) and 0 < f.eps < 1, "fingerprint.eps", f.eps)
        _check(_finite(f.budget) and f.budget > 0, "fingerprint.budget", f.budget)
        _check(_finite(f.function_budget) and 0 <= f.function_budget <= 1, "fingerprint.function_budget (0..1)",
               f.function_budget)  # fmt: skip
        _check(0 <= f.eval_copies <= t.clients, "fingerprint.eval_copies (0..train.clients)", f.eval_copies)
        _check(f.identity in ("auto", "partition-id", "node"), "fingerprint.identity (auto | partition-id | node)",
               f.identity)  # fmt: skip
        _check(1 <= f.anchor_every <= 100_000, "fingerprint.anchor_every (1..100000)", f.anchor_every)
        _check(s.graph in ("complete", "sparse"), "secagg.graph", s.graph)
        _check(_finite(s.clip) and 1e-9 <= s.clip <= 1e15, "secagg.clip (1e-9..1e15)", s.clip)
        _check(1 <= s.bits <= 32, "secagg.bits (1..32)", s.bits)
        _check(0 <= s.dropout < 1, "secagg.dropout", s.dropout)
        _check(_finite(s.timeout) and s.timeout > 0, "secagg.timeout", s.timeout)
        _check(_finite(s.grace) and 0 <= s.grace <= s.timeout, "secagg.grace (0..timeout)", s.grace)
        _check(not s.enabled or t.per_round >= 3, "train.per_round (masked aggregation needs >= 3)", t.per_round)
        _check(1 <= s.group <= t.per_round, "secagg.group (1..train.per_round)", s.group)
        _check(s.threat in THREATS and (s.threat == "semi-honest" or (s.enabled and s.graph == "complete")),
               "secagg.threat (semi-honest | malicious, which needs secagg.enabled and the complete graph)",
               s.threat)  # fmt: skip
        _check(not s.roster or (s.threat == "malicious" and _path_ok(s.roster)), "secagg.roster (a path, with "
               "secagg.threat = malicious)", s.roster)  # fmt: skip
        _check(_finite(s.signers) and 2 / 3 <= s.signers <= 1, "secagg.signers (2/3..1)", s.signers)
        _check(_finite(r.num_cpus) and r.num_cpus > 0, "resources.num_cpus", r.num_cpus)
        _check(_finite(r.num_gpus) and r.num_gpus >= 0, "resources.num_gpus", r.num_gpus)
        ray_key = "resources.ray_address (auto, host:port or ray://host:port)"
        _check(valid_ray_address(r.ray_address), ray_key, r.ray_address)
        _check(_path_ok(self.output), "output", self.output)
        _check(not d.files or _path_ok(d.files), "data.files", d.files)

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


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _path_ok(path: str) -> bool:
    """Not blank, no NUL, no control characters: a path a file system and a TOML file can both hold."""
    return bool(path.strip()) and not any(ord(c) < 32 or c == "\x7f" for c in path)


def check_ray_option(address: str) -> None:
    """``--ray``'s value: "local" or a cluster address (ConfigError otherwise)."""
    if address != "local" and not (address and valid_ray_address(address)):
        raise ConfigError(f"--ray {address!r}: expected local, auto, host:port or ray://host:port")


def valid_ray_address(address: str) -> bool:
    """ "" (a private instance), "auto", "host:port" or "ray://host:port" (port 1..65535)."""
    if address in ("", "auto"):
        return True
    m = re.fullmatch(r"(?:ray://)?(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})", address)
    return m is not None and 1 <= int(m.group(1)) <= 65535


def _path_entries(raw: dict[str, Any], keys: tuple[str, ...]) -> Iterator[tuple[dict[str, Any], str]]:
    """(table, key) for each non-empty string path under the dotted ``keys`` of a raw table."""
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node: Any = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            yield node, leaf


def _resolve_paths(raw: dict[str, Any], keys: tuple[str, ...], folder: Path) -> None:
    """Relative paths under ``keys`` in a file's raw table, resolved against ``folder`` (the file's)."""
    for node, leaf in _path_entries(raw, keys):
        node[leaf] = os.path.normpath(folder / os.path.expanduser(node[leaf]))


def _relative_paths(raw: dict[str, Any], keys: tuple[str, ...], folder: Path) -> None:
    """The inverse: paths (relative ones read against the working directory) written relative to ``folder``."""
    here = folder.resolve()
    for node, leaf in _path_entries(raw, keys):
        path = os.path.abspath(node[leaf])
        if os.path.commonpath([path, here]) != here.anchor:  # no relative path across unrelated trees
            node[leaf] = os.path.relpath(path, here)
        else:
            node[leaf] = path


def shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it (for reports), else as given."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


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


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a TOML basic string: JSON's escapes are TOML's, DEL escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
