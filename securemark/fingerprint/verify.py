"""Unit groups tried on the model they were derived from: each group's units permuted, rescaled, absorbed
by BatchNorm and sign-flipped (fingerprint.moves), and the model's outputs compared with its own on random
inputs, in float64. A permutation that changes the outputs means the derivation misread the model
(fingerprint.graph refuses it); a rescale or sign flip that does is simply not admitted. What a group
admits is then what this model really admits, whatever its code looks like: the rewrite attacks apply
exactly these moves, and alignment never needs more than a model allows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from torch import nn

from securemark.fingerprint import moves
from securemark.fingerprint.groups import AlignmentError, UnitGroup, units_of

BATCH = 4  # random inputs the outputs are compared on
Arrays = dict[str, np.ndarray]


class _Probe:
    """The model in float64 (float32 where it will not run in float64) on fixed random inputs."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        shape = (BATCH, *example.shape[1:])
        gen = torch.Generator().manual_seed(0)  # a test input, nothing secret
        for dtype in (torch.float64, torch.float32):
            self.model = copy.deepcopy(model).to(dtype).eval()
            self.x = torch.randn(shape, generator=gen, dtype=dtype)
            try:
                with torch.no_grad():
                    self.ref = self.model(self.x)
                break
            except RuntimeError:  # a forward that makes float32 tensors of its own
                continue
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.tol = (1e-9 if dtype == torch.float64 else 1e-4) * max(1.0, float(self.ref.abs().max()))

    def preserves(self, g: UnitGroup, move: Callable[[Arrays], None]) -> bool:
        """The outputs with ``move`` applied to the group's tensors (of any shape: the model runs on them as
        given, torch.func.functional_call) equal the model's own; a forward that fails is a no."""
        names = {m.tensor for m in g.members}
        arrs = {k: self.base[k].cpu().numpy().copy() for k in names}
        move(arrs)
        state = dict(self.base) | {k: torch.from_numpy(v).to(self.base[k].dtype) for k, v in arrs.items()}
        try:
            with torch.no_grad():
                out = torch.func.functional_call(self.model, state, (self.x,))
        except RuntimeError:  # a width the forward fixes (x.view(-1, 400)): the move is not admitted
            return False
        return bool(torch.isfinite(out).all()) and float((out - self.ref).abs().max()) <= self.tol


def verify(model: nn.Module, groups: list[UnitGroup], example: torch.Tensor) -> list[UnitGroup]:
    """``groups`` with what the model admits of each; AlignmentError when permuting a group changes the
    outputs (the derivation misread the model)."""
    if not groups:
        return []
    probe = _Probe(model, example)
    rng = np.random.default_rng(0)  # the moves tried: nothing secret
    out = []
    for g in groups:
        n = units_of({m.tensor: probe.base[m.tensor].numpy() for m in g.members}, g)
        perm = np.roll(np.arange(n), 1) if n > 1 else np.arange(n)  # every unit moves
        if not probe.preserves(g, partial(moves.permute, g=g, perm=perm)):
            raise AlignmentError(f"unit group {g.name!r}: permuting its units changes the model's outputs, so the "
                                 "graph was misread there (a layout the derivation does not know)")  # fmt: skip
        admits = ["permute"]
        scale = np.exp(rng.uniform(-1.0, 1.0, n))
        if "rescale" in g.admits and probe.preserves(g, partial(moves.rescale, g=g, a=scale)):
            admits.append("rescale")
        parts = len(moves.sections(g))
        if parts:  # each section its own factors: the sections must be independent
            factors = [np.exp(rng.uniform(-1.0, 1.0, n)) for _ in range(parts)]
            if probe.preserves(g, partial(moves.absorb, g=g, r=factors)):
                admits.append("absorb")
            signs = [np.where(rng.random(n) < 0.5, -1.0, 1.0) for _ in range(parts)]
            if probe.preserves(g, partial(moves.absorb, g=g, r=signs)):
                admits.append("signflip")
        if probe.preserves(g, partial(moves.widen, g=g)):
            admits.append("widen")
        out.append(replace(g, admits=tuple(admits)))
    return out
