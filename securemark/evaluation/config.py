"""What ``securemark evaluate`` runs: a base model, schemes, attack pipelines, coalition sizes, trials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from securemark.attacks import pipeline
from securemark.codes.base import CODE_KINDS
from securemark.config import ConfigError, TomlConfig, _check, _finite, _path_ok
from securemark.fingerprint.carrier import CARRIER_MODES

SCHEMES = (*CODE_KINDS, "fedtracker")  # a shared-projection code traced by score, or the per-customer baseline


@dataclass(frozen=True)
class SourceConfig:
    run: str = "runs/quickstart"  # a `securemark simulate` output: global.safetensors + config.toml
    config: str = ""  # a simulate config to train `run` with first, when it holds no finished run
    overrides: tuple[str, ...] = ()  # KEY=VALUE applied to that config (e.g. "model.name=resnet8"), as --set
    # a run a user's own Flower app made (no config.toml; SecureMark(model=, example_input=) registered its model):
    # its held-out data, an .npz of inputs x (N,C,H,W) and labels y, half the pirate's pool and half the test set
    data: str = ""


@dataclass(frozen=True)
class CodeSettings:
    """The registry each scheme gets (BIBD fixes its own length from max_colluders)."""

    length: int = 2048
    max_colluders: int = 8
    eps: float = 1e-3
    budget: float = 0.05  # fidelity: perturbation RMS / carrier RMS
    carrier_mode: str = "weights"  # weights | filter-mean (Uchida's carrier)
    include: tuple[str, ...] = ("*",)  # carrier tensors (fnmatch patterns)


@dataclass(frozen=True)
class TrialSettings:
    customers: int = 1000  # copies issued (BIBD serves at most q^2 + q + 1)
    schemes: tuple[str, ...] = ("tardos",)
    coalition_sizes: tuple[int, ...] = (1, 2, 4, 8)  # 0: a control, the unmarked base model under the attack
    trials: int = 200  # per cell (scheme, attack, coalition size)
    seed: int = 0  # coalitions and attack randomness; shared by all schemes, so cells are paired
    # the attacked model's test accuracy on the first this-many trials of a cell (0: all). Accuracy is an attack
    # cost, not a tracing figure, and on the quickstart CNN it was 40% of a trial's time
    accuracy_trials: int = 0


@dataclass(frozen=True)
class FidelitySettings:
    copies: int = 20  # random customers whose copies are evaluated per scheme
    budgets: tuple[float, ...] = ()  # sweep: copy accuracy (and traitor score after `attack`) per budget
    attack: str = ""  # an attack pipeline applied to one copy per customer at each budget of the sweep


@dataclass(frozen=True)
class BlackBoxSettings:
    """Black-box cells (evaluation.blackbox): copies carrying the function mark, students distilled from them,
    traced through their outputs alone. They run in this process after the white-box cells."""

    trials: int = 0  # per cell; 0: no black-box cells
    students: tuple[str, ...] = ("cnn:4", "mlp:4", "cnn:1", "mlp:1", "cnn:hard", "mlp:hard")  # arch:T or arch:hard
    coalition_sizes: tuple[int, ...] = (1, 2, 4)  # a control (a student of the unmarked model) is always added
    budget: float = 0.03  # function mark RMS / centred logits RMS
    queries: int = 10_000  # the tracer's queries per suspect
    epochs: int = 20  # the pirate's distillation epochs
    copies: int = 10  # copies measured for fidelity
    triggers: int = 0  # trigger-set baseline: keys per customer (0: none)
    tail: int = 0  # innocent tail: this many independent models, intact copies and students of single copies

    def student_cells(self) -> list[tuple[str, float, bool]]:
        """(architecture, temperature, hard labels) per entry of ``students``."""
        out = []
        for entry in self.students:
            arch, _, how = entry.partition(":")
            out.append((arch, 1.0, True) if how == "hard" else (arch, float(how), False))
        return out


def _student_ok(entry: str) -> bool:
    arch, sep, how = entry.partition(":")
    if arch not in ("cnn", "mlp") or not sep:
        return False
    if how == "hard":
        return True
    try:
        return _finite(float(how)) and 0.1 <= float(how) <= 100
    except ValueError:
        return False


@dataclass(frozen=True)
class EvalConfig(TomlConfig):
    PATHS: ClassVar[tuple[str, ...]] = ("output", "source.run", "source.config", "source.data")
    source: SourceConfig = field(default_factory=SourceConfig)
    code: CodeSettings = field(default_factory=CodeSettings)
    evaluate: TrialSettings = field(default_factory=TrialSettings)
    attacks: dict[str, str] = field(default_factory=lambda: {"average": "collude:average"})  # name -> pipeline
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    blackbox: BlackBoxSettings = field(default_factory=BlackBoxSettings)
    output: str = "runs/evaluate"

    def __post_init__(self) -> None:
        c, e, f = self.code, self.evaluate, self.fidelity
        _check(_path_ok(self.source.run), "source.run", self.source.run)
        _check(not self.source.config or _path_ok(self.source.config), "source.config", self.source.config)
        _check(all("=" in o for o in self.source.overrides), "source.overrides (KEY=VALUE)", self.source.overrides)
        _check(_path_ok(self.output), "output", self.output)
        _check(16 <= c.length <= 1 << 20, "code.length (16..2^20)", c.length)
        _check(1 <= c.max_colluders <= 1000, "code.max_colluders", c.max_colluders)
        _check(_finite(c.eps) and 0 < c.eps < 1, "code.eps", c.eps)
        _check(_finite(c.budget) and c.budget > 0, "code.budget", c.budget)
        _check(c.carrier_mode in CARRIER_MODES, "code.carrier_mode", c.carrier_mode)
        _check(bool(c.include) and all(c.include), "code.include", c.include)
        _check(2 <= e.customers <= 10_000_000, "evaluate.customers", e.customers)
        _check(bool(e.schemes) and all(s in SCHEMES for s in e.schemes), f"evaluate.schemes (of {SCHEMES})", e.schemes)
        _check(len(set(e.schemes)) == len(e.schemes), "evaluate.schemes (repeated)", e.schemes)
        sizes = e.coalition_sizes
        sizes_fit = bool(sizes) and all(0 <= k <= e.customers for k in sizes)
        _check(sizes_fit or not self.attacks, "evaluate.coalition_sizes", sizes)  # unused without white-box cells
        _check(1 <= e.trials <= 10_000_000, "evaluate.trials", e.trials)
        _check(0 <= e.seed < 1 << 63, "evaluate.seed", e.seed)
        _check(e.accuracy_trials >= 0, "evaluate.accuracy_trials", e.accuracy_trials)
        b = self.blackbox
        _check(0 <= b.trials <= 1_000_000, "blackbox.trials", b.trials)
        _check(bool(self.attacks) or b.trials > 0, "attacks (at least one, or black-box cells)", self.attacks)
        _check(bool(self.attacks) or not (f.budgets or f.attack), "fidelity (a sweep needs white-box cells)",
               f.budgets)  # fmt: skip
        _check(b.trials > 0 or (b.tail == 0 and b.triggers == 0), "blackbox.trials (tail and triggers need "
               "black-box cells)", b.trials)  # fmt: skip
        _check(bool(b.students) and all(_student_ok(x) for x in b.students), "blackbox.students (cnn|mlp:T, "
               "T in [0.1, 100], or cnn|mlp:hard)", b.students)  # fmt: skip
        _check(len(set(b.student_cells())) == len(b.students), "blackbox.students (repeated)", b.students)
        sizes_ok = bool(b.coalition_sizes) and len(set(b.coalition_sizes)) == len(b.coalition_sizes)
        _check(sizes_ok and all(1 <= k <= e.customers for k in b.coalition_sizes), "blackbox.coalition_sizes",
               b.coalition_sizes)  # fmt: skip
        _check(_finite(b.budget) and 0 < b.budget <= 1, "blackbox.budget (0..1]", b.budget)
        _check(1 <= b.queries <= 1_000_000, "blackbox.queries", b.queries)
        copies_fit = b.copies >= 1 and (b.trials == 0 or b.copies <= e.customers)  # default 10: for the cells only
        _check(1 <= b.epochs <= 10_000 and copies_fit, "blackbox.epochs, blackbox.copies",
               (b.epochs, b.copies))  # fmt: skip
        _check(0 <= b.triggers <= 1000 and 0 <= b.tail <= 100_000, "blackbox.triggers, blackbox.tail",
               (b.triggers, b.tail))  # fmt: skip
        specs = [(f"attacks.{name}", spec) for name, spec in self.attacks.items()]
        for key, spec in specs + ([("fidelity.attack", f.attack)] if f.attack else []):
            try:
                pipeline.parse(spec)
            except ValueError as exc:
                raise ConfigError(f"invalid value for {key}: {exc}") from None
        _check(1 <= f.copies <= 1_000_000, "fidelity.copies", f.copies)  # capped at the customers when run
        _check(all(_finite(b) and b > 0 for b in f.budgets), "fidelity.budgets", f.budgets)
        _check(not f.budgets or any(s in ("tardos", "random") for s in e.schemes), "fidelity.budgets (sweeps a "
               "tardos or random scheme)", e.schemes)  # fmt: skip

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
        return super().load(path, overrides)
