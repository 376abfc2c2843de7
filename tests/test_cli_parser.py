"""The command line's surface, pinned: every command path's options (flags, default, type, choices, nargs,
required, help) against tests/cli_parser_golden.json, the exit code of a bad option, and a parse that stays
torch-free.

A change to the parser that is meant goes with a regenerated golden file, read in review:
    .venv/bin/python -m tests.test_cli_parser
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from securemark.cli import build_parser, main

GOLDEN = Path(__file__).with_name("cli_parser_golden.json")


def _value(value: Any) -> Any:
    """A default, const or choice as JSON: paths and functions by name, so that the file reads plainly."""
    if isinstance(value, Path):
        return f"Path({str(value)!r})"
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _value(v) for k, v in value.items()}
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return value


def _option(action: argparse.Action) -> dict[str, Any]:
    return {
        "flags": list(action.option_strings) or [action.dest],
        "dest": action.dest,
        "action": type(action).__name__,
        "default": _value(action.default),
        "const": _value(action.const),
        "type": None if action.type is None else _value(action.type),
        "choices": None if action.choices is None else _value(list(action.choices)),
        "nargs": action.nargs,
        "required": action.required,
        "metavar": action.metavar,
        "help": action.help,
    }


def describe(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every command path (words joined by spaces; "" for the top) mapped to its options, its defaults
    (the command function it runs) and its sub-commands with their help."""
    entry: dict[str, Any] = {"options": [], "defaults": _value(dict(sorted(parser._defaults.items())))}
    found = {" ".join(path): entry}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            entry["subcommands"] = {
                "dest": action.dest,
                "required": action.required,
                "choices": [[name, helps.get(name)] for name in action.choices],  # in order: as --help lists them
            }
            for name, sub in action.choices.items():
                found |= describe(sub, (*path, name))
        else:
            entry["options"].append(_option(action))
    return found


def _current() -> dict[str, Any]:
    return describe(build_parser())


def write_golden() -> None:
    """Regenerate the golden file from the parser as it is now."""
    GOLDEN.write_text(json.dumps(_current(), indent=1, sort_keys=True) + "\n")


def test_the_parser_matches_the_golden_file():
    golden = json.loads(GOLDEN.read_text())
    current = json.loads(json.dumps(_current()))  # tuples as lists, as the file holds them
    assert sorted(current) == sorted(golden), "command paths added or removed"
    for path in golden:
        assert current[path] == golden[path], f"securemark {path}: options differ from {GOLDEN.name}"


def _leaves() -> list[str]:
    return [path for path, entry in _current().items() if "subcommands" not in entry]


@pytest.mark.parametrize("path", _leaves())
def test_a_bad_option_exits_2(path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*path.split(), "--no-such-option"])
    err = capsys.readouterr().err  # unrecognized, or a required argument missing: argparse's own line
    assert stop.value.code == 2 and "error:" in err and "Traceback" not in err


def test_an_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["codes", "eval", "--no-such-option"])
    assert stop.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_a_missing_command_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2 and "required" in capsys.readouterr().err


PARSE_EVERY_HELP = """
import contextlib, io, json, sys
from securemark.cli import build_parser

for path in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        build_parser().parse_args([*path.split(), "--help"])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "flwr", "ray"})))
"""


def test_parsing_every_help_stays_torch_free():
    """The parse runs before any command: heavy imports wait inside the command functions."""
    paths = json.dumps(list(_current()))
    done = subprocess.run(
        [sys.executable, "-c", PARSE_EVERY_HELP, paths], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout) == []


def test_python_m_securemark_cli_runs_main():
    done = subprocess.run(
        [sys.executable, "-m", "securemark.cli", "codes", "eval", "--users", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "argument --users: must be an integer >= 1" in done.stderr


if __name__ == "__main__":
    write_golden()
