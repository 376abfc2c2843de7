"""Collusion-resistant codes (numpy only): Tardos (default), random +-1 rows, BIBD AND-ACC."""

from securemark.codes.base import accusation_threshold, gaussian_sf, pack_bits, unpack_bits

__all__ = ["accusation_threshold", "gaussian_sf", "pack_bits", "unpack_bits"]
