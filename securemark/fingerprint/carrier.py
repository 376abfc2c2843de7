"""The carrier: which parameters hold the fingerprint, read as one vector v in a fixed order.

Default: every floating-point tensor with >= 2 dims (conv and linear weights), sorted by name so the order
does not depend on how a state_dict was built. ``filter-mean`` is Uchida et al.'s carrier: the mean over the
output filters of each selected tensor; writing a change d to it adds d to every filter.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from securemark.errors import SecureMarkError

StateDict = Mapping[str, torch.Tensor]
CARRIER_MODES = ("weights", "filter-mean")


class CarrierMismatch(SecureMarkError, ValueError):
    """A model does not have the tensors (names, shapes) the carrier was laid out for."""


@dataclass(frozen=True)
class CarrierSpec:
    include: tuple[str, ...] = ("*",)  # fnmatch patterns on parameter names
    exclude: tuple[str, ...] = ()
    mode: str = "weights"
    min_dims: int = 2

    def __post_init__(self) -> None:
        if self.mode not in CARRIER_MODES:
            raise ValueError(f"carrier mode must be one of {CARRIER_MODES}, got {self.mode!r}")

    def select(self, sd: StateDict) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the carrier tensors, in carrier order."""
        chosen = [
            (name, tuple(t.shape))
            for name, t in sorted(sd.items())
            if t.is_floating_point()
            and t.dim() >= self.min_dims
            and any(fnmatch.fnmatchcase(name, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        ]
        if not chosen:
            raise CarrierMismatch(f"no tensor matches the carrier {self}")
        return chosen

    def layout(self, sd: StateDict) -> CarrierLayout:
        return CarrierLayout(self, tuple(self.select(sd)))


@dataclass(frozen=True)
class CarrierLayout:
    """A carrier bound to concrete tensors: reads v (M,) from a state_dict and writes changes back."""

    spec: CarrierSpec
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    def _width(self, shape: tuple[int, ...]) -> int:
        full = int(np.prod(shape))
        return full // shape[0] if self.spec.mode == "filter-mean" else full

    @property
    def size(self) -> int:
        return sum(self._width(shape) for _, shape in self.tensors)

    def check(self, sd: StateDict) -> None:
        """Raise CarrierMismatch naming the first tensor that is missing or of another shape."""
        for name, shape in self.tensors:
            if name not in sd:
                raise CarrierMismatch(f"tensor {name!r} is missing (expected shape {list(shape)})")
            got = tuple(sd[name].shape)
            if got != shape:
                raise CarrierMismatch(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")

    def read(self, sd: StateDict) -> np.ndarray:
        """The carrier vector v (M,) in float64."""
        self.check(sd)
        parts = []
        for name, _ in self.tensors:
            t = sd[name].detach().to("cpu", torch.float64)
            parts.append((t.mean(dim=0) if self.spec.mode == "filter-mean" else t).reshape(-1).numpy())
        return np.concatenate(parts)

    def add(self, sd: StateDict, delta: np.ndarray) -> dict[str, torch.Tensor]:
        """A new state_dict with ``delta`` (M,) added to the carrier; other tensors are shared, not copied."""
        self.check(sd)
        if delta.shape != (self.size,):
            raise ValueError(f"carrier change has shape {delta.shape}, expected ({self.size},)")
        out = dict(sd)
        offset = 0
        for name, shape in self.tensors:
            width = self._width(shape)
            d = torch.from_numpy(delta[offset : offset + width])
            offset += width
            t = sd[name]
            d = d.reshape(shape[1:]) if self.spec.mode == "filter-mean" else d.reshape(shape)
            work = torch.promote_types(t.dtype, d.dtype)  # float32 + float32 adds in place of a float64 detour
            out[name] = (t.detach().to(work) + d.to(t.device, work)).to(t.dtype)  # broadcasts over filters
        return out
