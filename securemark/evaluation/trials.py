"""One trial of the evaluation (a coalition drawn, its copies attacked, the result traced) and what runs a
scheme's trials: SerialRunner in this process, or securemark.flower.ray_trials.RayRunner on Ray actors, both
calling :func:`trial`, so a record is the same whichever process runs it. The harness
(securemark.evaluation.harness) picks the runner and submits every scheme's trials to it."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from securemark import training
from securemark.attacks import pipeline
from securemark.data import Dataset
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.schemes import Scheme
from securemark.fingerprint.arch import groups_of, record_of
from securemark.fingerprint.carrier import StateDict


@dataclass
class Setting:
    """What every trial shares: the base model, the pirate's data pool, the test set, a model to evaluate."""

    base: StateDict
    pool: Dataset  # the pirate's own data is drawn from here (fine-tuning fraction, distillation inputs)
    test: Dataset
    fresh: Callable[[], torch.nn.Module]

    def __post_init__(self) -> None:
        self._model = self.fresh()  # reused for every evaluation: weights are loaded, never trained
        self.global_accuracy = self.accuracy(self.base)
        # the architecture's record (its unit groups from its graph): the owner registers it, the pirate rewrites
        # with the same groups (it knows the architecture as well as the owner does)
        self.arch = record_of(self._model, (1, *self.test.x.shape[1:]))
        self.groups = groups_of(self.arch)

    def accuracy(self, sd: StateDict) -> float:
        return training.accuracy_of(self._model, sd, self.test)


def run_trial(
    scheme: Scheme,
    steps: list[pipeline.Step],
    size: int,
    rng: np.random.Generator,
    s: Setting,
    cfg: EvalConfig,
    with_accuracy: bool = True,
) -> dict[str, Any]:
    """One coalition of ``size`` customers attacks its copies with ``steps``; the scheme traces the result
    (and the attacked model's accuracy is measured when ``with_accuracy``, else NaN)."""
    coalition = np.sort(rng.choice(scheme.customers, size=size, replace=False))
    copies: list[StateDict] = [scheme.copy(int(j)) for j in coalition] or [s.base]  # size 0: the unmarked base
    attacker = pipeline.Attacker(s.fresh, s.pool, rng, length=cfg.code.length, budget=cfg.code.budget,
                                 groups=s.groups)  # fmt: skip
    t0 = time.perf_counter()
    pirate, _ = pipeline.run(copies, steps, attacker)
    t1 = time.perf_counter()
    outcome = scheme.trace(pirate)
    t2 = time.perf_counter()
    guilty = np.isin(outcome.accused, coalition)
    innocent = np.ones(scheme.customers, dtype=bool)
    innocent[coalition] = False
    bit_agreement, survival = scheme.survival(outcome, coalition)
    return {
        "coalition_size": size,
        "coalition": coalition.tolist(),
        "accused": outcome.accused.tolist(),
        "caught": bool(guilty.any()),
        "colluders_accused": int(guilty.sum()),
        "innocents_accused": int((~guilty).sum()),
        "accuracy": s.accuracy(pirate) if with_accuracy else float("nan"),
        "bit_agreement": bit_agreement,
        "survival": survival,
        "top_colluder_score": float(outcome.scores[coalition].max()) if size else float("nan"),
        "top_innocent_score": float(outcome.scores[innocent].max()),
        "threshold": outcome.threshold,
        "attack_seconds": t1 - t0,
        "tracing_seconds": t2 - t1,
    }


TrialKey = tuple[str, int, int]  # (attack, coalition size, trial index)
_steps = functools.cache(pipeline.parse)  # a pipeline's text parsed once, not once per trial
Done = Callable[[dict[str, Any]], None]


def trial(scheme: Scheme, key: TrialKey, s: Setting, cfg: EvalConfig) -> dict[str, Any]:
    """Trial t of cell (attack, c), its randomness drawn from ``default_rng([seed, attack's index, c, t])``:
    the same record whichever process runs it."""
    attack, size, t = key
    e = cfg.evaluate
    rng = np.random.default_rng([e.seed, list(cfg.attacks).index(attack), size, t])
    with_accuracy = not e.accuracy_trials or t < e.accuracy_trials
    record = run_trial(scheme, _steps(cfg.attacks[attack]), size, rng, s, cfg, with_accuracy)
    record.update(scheme=scheme.name, attack=attack, trial=t)
    return record


class Runner(Protocol):
    """Runs a scheme's trials and hands each record to ``done`` as it finishes: at once, one after another
    (serial), or on Ray actors while the caller goes on building the next scheme (``wait`` collects the rest).
    ``share`` gives it what every trial shares, once, before the first ``submit``."""

    def share(self, setting: Setting) -> None: ...

    def submit(self, scheme: Scheme, keys: list[TrialKey], done: Done) -> None: ...

    def wait(self, done: Done) -> None: ...


class SerialRunner:
    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.setting: Setting | None = None

    def share(self, setting: Setting) -> None:
        self.setting = setting

    def submit(self, scheme: Scheme, keys: list[TrialKey], done: Done) -> None:
        assert self.setting is not None, "share the setting first"
        for key in keys:
            done(trial(scheme, key, self.setting, self.cfg))

    def wait(self, done: Done) -> None:
        return None
