"""White-box fingerprints: owner secret, carrier selection, secret projection, embed / extract."""

from securemark.fingerprint.carrier import CarrierSpec
from securemark.fingerprint.embed import Fingerprinter, Projection
from securemark.fingerprint.keys import OwnerSecret

__all__ = ["CarrierSpec", "Fingerprinter", "OwnerSecret", "Projection"]
