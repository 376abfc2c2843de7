"""Loading and saving state_dicts safely: suspects are untrusted, so nothing here runs code from a file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from securemark.errors import SecureMarkError

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")


class ModelFileError(SecureMarkError, ValueError):
    """A model file is missing, of an unknown format, or not a flat mapping of names to tensors."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read .safetensors, or .pt/.pth with ``weights_only=True`` (no pickled code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    sd: object
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        elif path.suffix in (".pt", ".pth"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ModelFileError(f"{path}: unknown model format; use one of {', '.join(MODEL_SUFFIXES)}")
    except ModelFileError:
        raise
    except Exception as exc:  # a corrupt or hostile file must give a message, not a traceback
        if "weights_only" in str(exc):  # torch's own text advises weights_only=False: never, for a suspect
            raise ModelFileError(
                f"{path} holds pickled objects beyond tensors; refused (read with weights_only=True, as untrusted "
                "input must be): save it as a plain state_dict or .safetensors"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path} could not be read as a model: {first}") from None
    if isinstance(sd, Mapping) and not _flat(sd):  # a training checkpoint: its model's state_dict, when it has one
        inner = [sd[k] for k in CHECKPOINT_KEYS if isinstance(sd.get(k), Mapping) and _flat(sd[k])]
        if len(inner) == 1:
            sd = inner[0]
    if isinstance(sd, Mapping) and _flat(sd) and any(v.layout != torch.strided for v in sd.values()):
        raise ModelFileError(f"{path} holds sparse tensors; save a dense state_dict (tensor.to_dense())")
    if not isinstance(sd, Mapping) or not _flat(sd):
        held = "" if not isinstance(sd, Mapping) else f" (it holds {', '.join(repr(k) for k in list(sd)[:5])})"
        raise ModelFileError(
            f"{path} is not a flat mapping of tensor names to tensors (a state_dict){held}: save "
            f"model.state_dict(), or a checkpoint with it under one of {', '.join(CHECKPOINT_KEYS)}"
        )
    return dict(sd)


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")  # where checkpoints keep the model's state_dict
DDP_PREFIX = "module."  # torch.nn.parallel.DistributedDataParallel's (and DataParallel's) names


def _flat(sd: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())


def match_names(sd: Mapping[str, torch.Tensor], names: Iterable[str]) -> Mapping[str, torch.Tensor]:
    """``sd`` named as ``names`` are when the two differ by DistributedDataParallel's "module." prefix alone
    (a copy saved from a wrapped model, or a base that was); otherwise ``sd`` unchanged."""
    want = set(names)
    if not want or want <= sd.keys():
        return sd
    if all(k.startswith(DDP_PREFIX) for k in sd):
        stripped = {k.removeprefix(DDP_PREFIX): v for k, v in sd.items()}
        if want <= stripped.keys():
            return stripped
    prefixed = {DDP_PREFIX + k: v for k, v in sd.items()}
    return prefixed if want <= prefixed.keys() else sd


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for k, v in sd.items():  # tied weights (one storage under two names) are written as two tensors
        t = v.detach().to("cpu").contiguous()
        shared = t.untyped_storage().data_ptr() in seen and t.numel() > 0
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t.clone() if shared else t
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    elif path.suffix in (".pt", ".pth"):
        torch.save(tensors, path)
    else:
        raise ModelFileError(f"{path}: unknown model format; use one of {', '.join(MODEL_SUFFIXES)}")


def save_atomic(sd: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``sd`` to a temporary file beside ``path`` (mode 0600), then rename it into place: a reader, or a
    concurrent writer of the same file, only ever sees a whole file, and a failed write leaves nothing."""
    path = Path(path)
    if path.suffix not in MODEL_SUFFIXES:
        raise ModelFileError(f"{path}: unknown model format; use one of {', '.join(MODEL_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        save_state_dict(sd, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: identifies a model whatever file format holds it."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def first_bad_entry(sd: Mapping[str, torch.Tensor], limit: float = float("inf")) -> tuple[str, list[int], float] | None:
    """(tensor name, index, value) of the first floating entry, in name order, that is NaN, infinite or of
    magnitude >= ``limit``; None when there is none. Owner and tracer both refuse models that have one."""
    for name in sorted(sd):
        t = sd[name]
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.element_size() < 2:  # float8 has no isfinite: checked in float32, which holds every value
            t = t.float()
        bad = ~torch.isfinite(t) | (t.abs() >= limit)
        if bool(bad.any()):
            index = [int(i) for i in torch.nonzero(bad)[0]]
            return name, index, float(t[tuple(index)])
    return None
