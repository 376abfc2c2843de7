"""One root for every error securemark raises on purpose: a federated round fails on one and the run goes on,
the command line reports one in one line; anything else is a bug and ends the run or the command with its
traceback."""

import ast
import importlib
import io
from pathlib import Path

import pytest
from flwr.app import ArrayRecord
from rich.console import Console

from securemark.errors import InputError, RoundFailed, SecureMarkError

PACKAGE = Path(__file__).resolve().parents[1] / "securemark"


def _looks_like_an_exception(node: ast.ClassDef) -> bool:
    names = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
    return any(n in ("Exception", "BaseException") or n.endswith(("Error", "Exception")) for n in names)


def _exception_classes() -> dict[str, type]:
    """Every exception class defined at the top of a module under securemark/ (found by parsing each file,
    resolved by importing it); a class defined inside a function cannot be resolved, so none may look like an
    exception. ``__main__`` modules run a command when imported: they define no classes."""
    found: dict[str, type] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        nested = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and all(n is not t for t in top)]
        assert not [n.name for n in nested if _looks_like_an_exception(n)], path
        if path.name == "__main__.py":
            assert not top, path
            continue
        if not top:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for node in top:
            cls = getattr(module, node.name)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found[f"{module.__name__}.{node.name}"] = cls
    return found


def test_every_exception_class_securemark_defines_is_a_securemark_error():
    found = _exception_classes()
    names = {qual.rsplit(".", 1)[1] for qual in found}
    assert {"SecAggError", "BadOwner", "RegistryError", "ConfigError", "OracleError", "RoundFailed"} <= names
    # signals are no errors: SIGTERM unwinds as Ctrl-C does, past every ``except Exception``
    errors = {q: c for q, c in found.items() if issubclass(c, Exception)}
    assert set(found) - set(errors) == {"securemark.cli._Terminated"}
    assert [q for q, c in errors.items() if not issubclass(c, SecureMarkError)] == []


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("securemark.config.ConfigError", ValueError),
        ("securemark.modelio.ModelFileError", ValueError),
        ("securemark.fingerprint.function.FunctionMarkUnfit", ValueError),
        ("securemark.secagg.quantize.QuantizationError", ValueError),
        ("securemark.registry.params.RegistryError", RuntimeError),
        ("securemark.secagg.protocol.errors.TooFewSurvivors", RuntimeError),
        ("securemark.tracing.errors.OracleError", RuntimeError),
        ("securemark.errors.InputError", ValueError),
        ("securemark.errors.RoundFailed", RuntimeError),
    ],
)
def test_each_error_keeps_the_builtin_base_callers_catch(name, base):
    module, _, cls = name.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), cls), base)


def test_errors_imports_nothing_from_securemark():
    """Any module may import it: it can be part of no import cycle."""
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported == ["__future__"]


# --- a round ----------------------------------------------------------------------------------------------------
def _config(secagg, clients, rounds):
    from securemark.config import SimConfig

    return SimConfig.from_dict(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp"},
            "train": {"rounds": rounds, "clients": clients, "per_round": clients, "local_epochs": 1, "seed": 1},
            "fingerprint": {"enabled": False},
            "secagg": {"enabled": secagg},
        }
    )


def _strategy(cfg, tmp_path):
    from securemark.flower.server_app import strategy_for

    return strategy_for(cfg, tmp_path, max_weight=2000, console=Console(record=True, width=300, file=io.StringIO()))


def _initial():
    from securemark.models import build

    return ArrayRecord({k: v.detach().clone() for k, v in build("mlp", (1, 8, 8), 10, seed=1).state_dict().items()})


def _start(s, cfg, grid, rounds):
    from securemark.flower.server_app import train_config

    s.start(grid, _initial(), num_rounds=rounds, train_config=train_config(cfg))


@pytest.mark.parametrize("bug", [TypeError("a bug"), AttributeError("a bug"), ValueError("a bug in a library")])
def test_a_bug_in_a_round_ends_the_run_with_its_traceback(tmp_path, bug):
    from .flower.inprocess import InProcessGrid

    cfg = _config(secagg=True, clients=3, rounds=2)
    s = _strategy(cfg, tmp_path)

    def collect(*_args):
        raise bug

    s.sum.collect = collect
    with pytest.raises(type(bug), match="a bug"):
        _start(s, cfg, InProcessGrid(3), rounds=2)
    assert s.rounds == []  # no round recorded as merely failed


@pytest.mark.parametrize(("secagg", "kept", "why"), [(False, set(), "no client returned"), (True, {1000}, "threshold")])
def test_a_round_with_too_few_valid_updates_fails_and_the_run_goes_on(tmp_path, secagg, kept, why):
    from securemark.flower import wire

    from .flower.inprocess import InProcessGrid

    cfg = _config(secagg=secagg, clients=3, rounds=2)
    s = _strategy(cfg, tmp_path)
    real, trained = s.nodes.receive, []

    def lossy(stage, msgs, timeout, need=None):
        got = real(stage, msgs, timeout, need)
        if stage != wire.TRAIN:
            return got
        trained.append(stage)
        return {n: r for n, r in got.items() if n in kept} if len(trained) == 1 else got  # round 1: all but kept lost

    s.nodes.receive = lossy
    _start(s, cfg, InProcessGrid(3), rounds=2)
    assert [m["status"] for m in s.rounds] == ["failed", "completed"] and why in s.rounds[0]["reason"]


def test_a_masked_round_only_one_node_can_take_part_in_fails_and_the_run_goes_on(tmp_path):
    """Two nodes claim the same customer and are refused: the one left cannot be masked among others."""
    from .flower.inprocess import InProcessGrid

    cfg = _config(secagg=True, clients=3, rounds=2)
    s = _strategy(cfg, tmp_path)
    _start(s, cfg, InProcessGrid(3, partitions=[0, 0, 1]), rounds=2)
    assert [m["status"] for m in s.rounds] == ["failed", "failed"]
    assert "1 node(s) can take part in this round's masking; it needs at least 2" in s.rounds[0]["reason"]


# --- the command line -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [InputError("a bad value"), RoundFailed("a round failed")])
def test_the_cli_reports_a_securemark_error_in_one_line_and_exit_2(monkeypatch, capsys, error):
    from securemark.cli import codes, main

    def refused(_args):
        raise error

    monkeypatch.setattr(codes, "cmd_codes_eval", refused)
    assert main(["codes", "eval"]) == 2
    assert capsys.readouterr().err == f"securemark: error: {error}\n"


@pytest.mark.parametrize("bug", [TypeError("a bug"), ValueError("a bug in a library"), RuntimeError("a bug")])
def test_the_cli_lets_a_bug_through_with_its_traceback(monkeypatch, bug):
    from securemark.cli import codes, main

    def buggy(_args):
        raise bug

    monkeypatch.setattr(codes, "cmd_codes_eval", buggy)
    with pytest.raises(type(bug), match="a bug"):
        main(["codes", "eval"])
