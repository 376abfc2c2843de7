"""A run's checkpoint in ``out/checkpoint/``: written after every round, read back to resume.

It holds the global model, the inner strategy's server-optimizer state (FedAvgM's momentum, FedOpt's moments)
and ``state.json``: the strategy's ``state_dict()`` (round, fingerprint strength, metrics so far, graph RNG,
banned customers), the SHA-256 of each file and of the registry's owner key. Files go by round and
``state.json`` is replaced atomically last, so a kill at any instant leaves the previous checkpoint or the new
one; a damaged or edited checkpoint, one of another registry or another inner strategy, is refused whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from securemark.errors import InputError
from securemark.modelio import load_state_dict, save_state_dict

CHECKPOINT = "checkpoint"
_INNER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")  # Flower's FedAvgM and FedOpt family


def save(out: Path, weights: dict[str, torch.Tensor], inner: Strategy, state: dict[str, Any]) -> None:
    """Checkpoint round ``state["round"]``: the files first, then ``state.json`` naming them, then the older
    rounds' files removed."""
    r = state["round"]
    ck = out / CHECKPOINT
    ck.mkdir(exist_ok=True)
    model, optimizer = ck / f"round-{r}.safetensors", ck / f"round-{r}.inner.npz"
    save_state_dict(weights, model)
    np.savez(optimizer, **inner_state(inner))
    files = {f.name: sha256(f) for f in (model, optimizer)}
    atomic_write(ck / "state.json", json.dumps({**state, "registry": _owner_key(out), "files": files}, default=float))
    for old in ck.glob("round-*"):
        if old.name not in files:
            old.unlink()


def load(out: Path, num_rounds: int, inner: Strategy) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The last checkpoint in ``out``: its state and global model; the inner strategy's state restored."""
    path = out / CHECKPOINT / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} holds no checkpoint to resume (expected {path})")
    state = checked_state(path)
    for name, digest in state["files"].items():
        if sha256(path.parent / name) != digest:
            raise InputError(f"checkpoint file {name} in {path.parent} is damaged (its SHA-256 differs)")
    if state["registry"] != _owner_key(out):
        raise InputError(f"the checkpoint in {path.parent} belongs to another registry than {out / 'registry'}")
    if state["inner"] != type(inner).__name__:
        raise InputError(f"the checkpoint was made with {state['inner']}, this run wraps {type(inner).__name__}")
    if int(state["round"]) >= num_rounds or (out / "global.safetensors").exists():
        raise FileExistsError(f"{out} holds a finished run of {state['round']} rounds; nothing to resume")
    weights = load_state_dict(path.parent / f"round-{state['round']}.safetensors")
    restore_inner(inner, np.load(path.parent / f"round-{state['round']}.inner.npz"))
    return state, weights


def _owner_key(out: Path) -> str | None:
    """The SHA-256 of the run's owner key: binds a checkpoint to its registry."""
    key = out / "registry" / "owner.key"
    return sha256(key) if key.is_file() else None


def inner_state(inner: Strategy) -> dict[str, np.ndarray]:
    """The inner strategy's server-optimizer state as named arrays (``attr::kind::key``)."""
    out = {}
    for name in _INNER_STATE:
        value = getattr(inner, name, None)
        if isinstance(value, ArrayRecord):
            out.update({f"{name}::record::{k}": v.numpy() for k, v in value.items()})
        elif isinstance(value, dict):
            out.update({f"{name}::dict::{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            out.update({f"{name}::list::{i:06d}": np.asarray(v) for i, v in enumerate(value)})
    return out


def restore_inner(inner: Strategy, arrays: Any) -> None:
    found: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key in arrays.files:
        name, kind, sub = key.split("::", 2)
        found.setdefault((name, kind), {})[sub] = arrays[key]
    for (name, kind), values in found.items():
        if kind == "record":
            setattr(inner, name, ArrayRecord({k: Array(v) for k, v in values.items()}))
        elif kind == "dict":
            setattr(inner, name, values)
        else:
            setattr(inner, name, [values[k] for k in sorted(values)])


def checked_state(path: Path) -> dict[str, Any]:
    """state.json, every field checked: a damaged or edited checkpoint is refused, never half-used."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"checkpoint {path} cannot be read: {exc}") from None
    r = state.get("round") if isinstance(state, dict) else None
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InputError(f"checkpoint {path}: 'round' must be a whole number >= 1")
    strength = state.get("strength")
    if not isinstance(strength, int | float) or not math.isfinite(strength) or strength < 0:
        raise InputError(f"checkpoint {path}: 'strength' must be a finite number >= 0")
    files = state.get("files")
    expected = {f"round-{r}.safetensors", f"round-{r}.inner.npz"}
    if not isinstance(files, dict) or set(files) != expected:
        raise InputError(f"checkpoint {path}: 'files' must name exactly {sorted(expected)} with their SHA-256")
    if not isinstance(state.get("rounds"), list) or len(state["rounds"]) != r:
        raise InputError(f"checkpoint {path}: 'rounds' must hold the metrics of all {r} rounds")
    if not isinstance(state.get("banned"), list) or not isinstance(state.get("rng"), dict):
        raise InputError(f"checkpoint {path}: 'banned' and 'rng' are missing or malformed")
    if "registry" not in state or not isinstance(state.get("inner"), str):
        raise InputError(f"checkpoint {path}: 'registry' and 'inner' are missing")
    return state


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that a reader (or a crash) sees the old file or the new one, never a half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
