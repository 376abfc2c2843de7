"""What a registry is built with: the code and embedding parameters (RegistryParams, checked when built,
before anything touches the disk), and RegistryError, the one error every registry refusal raises."""

from __future__ import annotations

import math
from dataclasses import dataclass

from securemark.codes import bibd
from securemark.codes.base import CODE_KINDS
from securemark.errors import SecureMarkError
from securemark.fingerprint.carrier import CARRIER_MODES, CarrierSpec


class RegistryError(SecureMarkError, RuntimeError):
    """The registry is missing, corrupt, or asked for something it cannot give."""


@dataclass(frozen=True)
class RegistryParams:
    code: str = "tardos"
    length: int = 2048
    max_colluders: int = 5
    eps: float = 1e-3
    budget: float = 0.05  # fidelity: RMS(perturbation) / RMS(carrier)
    carrier_mode: str = "weights"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.code not in CODE_KINDS:
            raise RegistryError(f"code must be one of {CODE_KINDS}, got {self.code!r}")
        if self.carrier_mode not in CARRIER_MODES:
            raise RegistryError(f"carrier mode must be one of {CARRIER_MODES}, got {self.carrier_mode!r}")
        # every check is written so that NaN fails it (NaN compares False with everything)
        if not self.max_colluders >= 1:
            raise RegistryError(f"need max_colluders >= 1, got {self.max_colluders}")
        if not 0 < self.eps < 1:
            raise RegistryError(f"need 0 < eps < 1, got {self.eps}")
        if not 0 < self.budget < math.inf:  # a NaN or infinite budget gives NaN or infinite copies
            raise RegistryError(f"need a finite budget > 0, got {self.budget}")
        if self.code == "bibd":
            q = bibd.plane_order_for(self.max_colluders)
            object.__setattr__(self, "length", q * q + q + 1)  # the design fixes the length
        elif not self.length >= 16:
            raise RegistryError(f"code length must be >= 16, got {self.length}")

    @property
    def carrier(self) -> CarrierSpec:
        return CarrierSpec(include=self.include, exclude=self.exclude, mode=self.carrier_mode)

    @property
    def capacity(self) -> int | None:
        """How many customers the code can serve (None: unbounded in practice)."""
        return self.length if self.code == "bibd" else None
