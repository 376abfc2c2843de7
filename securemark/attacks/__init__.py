"""Attacks on state_dicts. Each returns (new_state_dict, record) where the record says what was done."""

from securemark.attacks.collude import COLLUSION_METHODS, collude, mix_rounds
from securemark.attacks.launder import add_noise, distill, finetune, overwrite, prune, quantize

__all__ = [
    "COLLUSION_METHODS", "add_noise", "collude", "distill", "finetune", "mix_rounds", "overwrite", "prune", "quantize",
]  # fmt: skip
