"""``securemark bench blackbox``: the black-box cells (securemark.evaluation.blackbox) on the MNIST-5k quickstart
CNN, trained here centrally or loaded from a state dict."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from securemark import data, models, training
from securemark.evaluation.blackbox import Setup, run
from securemark.modelio import load_state_dict

SHAPE = (1, 28, 28)


def train_base(pool: data.Dataset, seed: int, epochs: int = 8, arch: str = "cnn") -> torch.nn.Module:
    model = models.build(arch, tuple(pool.x.shape[1:]), pool.classes, seed=seed)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    training.train(model, pool, epochs=epochs, lr=0.05, generator=gen, device=torch.device("cpu"))
    return model.eval()


def bench_blackbox(base: Path | None = None, seed: int = 0, **kw: object) -> dict[str, object]:
    """``securemark bench blackbox``: the MNIST-5k quickstart CNN, trained centrally on 80% (or loaded from
    ``base``, a torch.save'd state dict), the other 20% held out."""
    start_time = time.perf_counter()
    pool, held = data.load("mnist5k", seed).split(0.2, seed)
    spec = models.spec_of("cnn", SHAPE, 10)
    if base is None:
        model = train_base(pool, seed)
    else:
        model = models.from_spec(spec, load_state_dict(base))
    record = {"name": "mnist5k", "seed": seed, "test_fraction": 0.2, "files": ""}
    result = run(Setup(model, spec, pool, held, record), seed=seed, **kw)  # type: ignore[arg-type]
    result["seconds"] = round(time.perf_counter() - start_time, 1)
    return result
