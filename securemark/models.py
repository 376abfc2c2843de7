"""Small models written here (no torchvision): an MLP, a small CNN, and a CIFAR-size CNN; and, by name, the
corpus of users' architectures (securemark.corpus: ResNets, VGG, MobileNetV2, a ViT, Flower's Net) at their
small sizes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from securemark import corpus
from securemark.config import MODEL_NAMES
from securemark.errors import InputError

MODELS = ("mlp", "cnn", "cifar-cnn", *corpus.CORPUS)
assert MODELS == MODEL_NAMES
# the keyword a corpus model's width (model.width) sets; None: its width is fixed
CORPUS_WIDTH = {"resnet18": "width", "resnet8": "width", "cifar-resnet18": "width", "preact-resnet18": "width",
                "vgg11-bn": "width",
                "vit-tiny": "dim", "mobilenet-v2": None, "flower-net": None}  # fmt: skip


class MLP(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], classes: int, hidden: int = 128) -> None:
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; ~105k parameters on 28x28, ~10k on 8x8."""

    def __init__(self, in_shape: tuple[int, int, int], classes: int, width: int = 16) -> None:
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), 64), nn.ReLU(), nn.Linear(64, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CifarCNN(nn.Module):
    """Three conv blocks for 32x32 colour images (~0.3M parameters)."""

    def __init__(self, in_shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        for cin, cout in ((c, 32), (32, 64), (64, 128)):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)  # (B, 128, H/8, W/8)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * (h // 8) * (w // 8), 128), nn.ReLU(), nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mlp_width_for(params: int, in_shape: tuple[int, int, int], classes: int) -> int:
    """The MLP hidden width whose parameter count is closest to ``params``: h (in + 1 + classes) + classes."""
    c, h, w = in_shape
    return max(1, round((params - classes) / (c * h * w + 1 + classes)))


def build(name: str, in_shape: tuple[int, int, int], classes: int, seed: int = 0, width: int = 0) -> nn.Module:
    """A freshly initialized model; ``seed`` makes the initialization reproducible. ``width`` sets the MLP's
    hidden units or the small CNN's base channels (0: the default); the CIFAR CNN has a fixed width. The
    caller's global torch random state is left as it was (building a model must not reseed a training loop)."""
    if width < 0:
        raise ValueError(f"model width must be >= 0, got {width}")
    with torch.random.fork_rng(devices=[]):  # the CPU generator, put back after; GPU generators never touched
        torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would reseed every GPU's too
        return _build(name, in_shape, classes, width)


def _build(name: str, in_shape: tuple[int, int, int], classes: int, width: int) -> nn.Module:
    if name == "mlp":
        return MLP(in_shape, classes, hidden=width or DEFAULT_WIDTH["mlp"])
    if name == "cnn":
        return SmallCNN(in_shape, classes, width=width or DEFAULT_WIDTH["cnn"])
    if name == "cifar-cnn":
        return CifarCNN(in_shape, classes)
    if name in corpus.CORPUS:
        return _corpus(name, in_shape, classes, width)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def _corpus(name: str, in_shape: tuple[int, int, int], classes: int, width: int) -> nn.Module:
    c, h, w = in_shape
    kwargs: dict[str, object] = {"num_classes": classes, "in_channels": c}
    if name == "vit-tiny":
        if h != w:
            raise InputError(f"vit-tiny takes square images, got {h}x{w}")
        kwargs["img_size"] = h
    if width:
        if CORPUS_WIDTH[name] is None:
            raise InputError(f"model {name!r} has a fixed width: set model.width = 0")
        kwargs[str(CORPUS_WIDTH[name])] = width
    return corpus.build(name, **kwargs)


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model.load_state_dict(sd)``, or, when tensors differ in shape (a widened copy: added or split units),
    the tensors put in place of the module's own. Linear, Conv and BatchNorm read their shapes from their
    tensors, so the wider model runs (and trains) as the pirate who widened it would run it."""
    try:
        model.load_state_dict(dict(sd))
        return model
    except RuntimeError:
        pass
    for name, t in sd.items():
        prefix, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            raise InputError(f"{name!r} names no module of {type(model).__name__}") from None
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(t.detach().clone())
        elif leaf in module._buffers:
            module._buffers[leaf] = t.detach().clone()
        else:
            raise InputError(f"{name!r} is neither a parameter nor a buffer of {type(model).__name__}")
    return model


def from_spec(spec: Mapping[str, object], sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model :func:`build_spec` names, carrying the weights ``sd`` (:func:`load_weights`), in eval mode."""
    return load_weights(build_spec(spec), sd).eval()


DEFAULT_WIDTH = {"cnn": 16, "mlp": 128}  # what width 0 builds


def spec_of(name: str, in_shape: tuple[int, int, int], classes: int, width: int = 0) -> dict[str, object]:
    """What :func:`build_spec` needs to rebuild a model (kept in the registry beside a function mark)."""
    return {"name": name, "in_shape": list(in_shape), "classes": classes, "width": width}


def same_spec(a: object, b: object) -> bool:
    """Whether two :func:`spec_of` records build the same model: width 0 and the default width are one."""

    def canonical(spec: object) -> object:
        if not isinstance(spec, Mapping) or spec.get("width") != 0:
            return spec
        return {**spec, "width": DEFAULT_WIDTH.get(str(spec.get("name")), 0)}

    return canonical(a) == canonical(b)


def build_spec(spec: Mapping[str, object]) -> nn.Module:
    """A model built from :func:`spec_of`'s record; ValueError for a record that names no model here."""
    try:
        c, h, w = (int(v) for v in spec["in_shape"])  # type: ignore[attr-defined]
        return build(str(spec["name"]), (c, h, w), int(spec["classes"]), width=int(spec.get("width", 0)))  # type: ignore[call-overload]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a model record: {dict(spec)} ({exc})") from None
