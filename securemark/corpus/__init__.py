"""A corpus of users' architectures written as their public references write them (module layout, attribute names and
so state_dict keys), in plain torch, to test fingerprint alignment and tracing on models that customers really train.

``CORPUS`` maps a name to its builder at the reference's size; ``SMALL`` gives each one's keyword arguments for a
small version (a forward and backward pass on 64 images of 3x32x32 in well under 0.2 s on two CPU cores), and
``build`` makes that small version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from securemark.corpus.mobilenet import mobilenet_v2
from securemark.corpus.net import flower_net
from securemark.corpus.preact import preact_resnet18
from securemark.corpus.resnet import cifar_resnet18, resnet8, resnet18
from securemark.corpus.vgg import vgg11_bn
from securemark.corpus.vit import vit_tiny

CORPUS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet8": resnet8,
    "cifar-resnet18": cifar_resnet18,
    "preact-resnet18": preact_resnet18,
    "vgg11-bn": vgg11_bn,
    "mobilenet-v2": mobilenet_v2,
    "vit-tiny": vit_tiny,
    "flower-net": flower_net,
}

SMALL: dict[str, dict[str, Any]] = {
    "resnet18": {"width": 16},
    "resnet8": {"width": 16},
    "cifar-resnet18": {"width": 8},
    "preact-resnet18": {"width": 8},
    "vgg11-bn": {"width": 8, "hidden": 64},
    "mobilenet-v2": {"width_mult": 0.25, "last_channel": 128},
    "vit-tiny": {"dim": 32, "depth": 2, "heads": 2, "patch": 8},
    "flower-net": {},
}


def build(name: str, **overrides: Any) -> nn.Module:
    """The small version of corpus model ``name``, its keyword arguments updated with ``overrides``."""
    if name not in CORPUS:
        raise ValueError(f"unknown corpus model {name!r}; known: {', '.join(CORPUS)}")
    return CORPUS[name](**{**SMALL[name], **overrides})
