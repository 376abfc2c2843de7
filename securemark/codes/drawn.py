"""The issued code drawn from the owner secret: the bias vector and the code rows a registry hands out.

Where :mod:`securemark.codes.tardos` takes its uniforms from the caller, this module fixes them for issued
codes: they come from the ChaCha20 keystream under a key the owner secret derives for one purpose
(``code-bias``, ``code-row/<i>``), so one secret always gives one code. Pure functions: storing what they
return is the registry's job.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from securemark.codes import bibd, tardos
from securemark.codes.random import uniform_bias
from securemark.prg import uniforms


class OwnerSecret(Protocol):
    """What the code needs of the owner secret (securemark.fingerprint.keys.OwnerSecret): a key per purpose.
    Named here as a protocol so that codes/ does not depend on fingerprint/."""

    def derive(self, purpose: str) -> bytes: ...


def bias(secret: OwnerSecret, code: str, length: int, max_colluders: int) -> np.ndarray:
    """The bias vector of a new ``code`` (a name in CODE_KINDS) of ``length`` bits against ``max_colluders``."""
    if code == "tardos":
        return tardos.arcsine_bias(uniforms(secret.derive("code-bias"), length), max_colluders)
    if code == "random":
        return uniform_bias(length)
    rows = bibd.code_rows(bibd.plane_order_for(max_colluders))
    return rows.mean(axis=0)  # BIBD rows are fixed; the column means describe them


def row(bias: np.ndarray, secret: OwnerSecret, index: int) -> np.ndarray:
    """Bits of Tardos or random code row ``index``, one per entry of ``bias`` (BIBD rows are fixed, not drawn:
    see :func:`securemark.codes.bibd.code_rows`)."""
    return tardos.draw_rows(bias, uniforms(secret.derive(f"code-row/{index}"), bias.size))
