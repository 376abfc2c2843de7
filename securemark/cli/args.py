"""The checks the parser makes of an argument, so that a bad value exits 2 with argparse's one line before
any work: integers with a floor, finite numbers; and the options every command run from a config shares."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from securemark.errors import InputError


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _natural(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def _nonnegative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _config_command(parent: Any, name: str, help: str, example: str, unique: bool = False) -> argparse.ArgumentParser:
    """A command run from a config file: CONFIG, --out, --set."""
    cmd = parent.add_parser(name, help=help)
    cmd.add_argument("config", type=Path, nargs="?" if name == "simulate" else None, help="the TOML config")
    made_unique = ", made unique" if unique else ""
    cmd.add_argument("--out", default=None, help=f"output directory (default: the config's output{made_unique})")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override, e.g. {example}")
    return cmd


def add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=_natural, default=0, help="seed of the simulated randomness (never of a secret)")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (strict; nothing else goes there)"
    )


def add_arch(parser: argparse.ArgumentParser, what: str) -> None:
    """--arch, --arch-kwargs, --example-input: the owner's model class, for unit groups from its graph."""
    parser.add_argument("--arch", default=None, metavar="MODULE:CALLABLE",
                        help=f"the owner's function or class that builds the model (imported from the working "
                        f"directory or PYTHONPATH): {what}")  # fmt: skip
    parser.add_argument(
        "--arch-kwargs", default=None, metavar="JSON", help="keyword arguments for --arch (JSON object)"
    )
    parser.add_argument("--example-input", default=None, metavar="SHAPE",
                        help="the shape of one input batch for --arch, e.g. 1,3,32,32")  # fmt: skip


def arch_of(a: argparse.Namespace) -> Any:
    """The Arch the options name (None without --arch); --arch-kwargs or --example-input alone are refused."""
    if a.arch is None:
        if a.arch_kwargs is not None or a.example_input is not None:
            raise InputError("--arch-kwargs and --example-input go with --arch")
        return None
    from securemark.fingerprint.arch import Arch

    return Arch.parse(a.arch, a.arch_kwargs, a.example_input)


class ShowDefaults(argparse.HelpFormatter):
    """Help text that ends in the option's default wherever it has one worth showing (not None, False or [])
    and the text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every parser under ``parser`` (itself included) formats its help with :class:`ShowDefaults`."""
    parser.formatter_class = ShowDefaults
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)


def arch_record(a: argparse.Namespace) -> dict | None:
    """The registry's record of --arch (None without it); a model whose graph cannot be covered is refused here,
    before anything is written."""
    arch = arch_of(a)
    return None if arch is None else arch.record()
