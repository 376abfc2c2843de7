"""securemark command line: codes | registry | issue | trace | attack | bench | simulate | evaluate | demo |
roster.

One command runs per call. Under --json its result is printed as strict JSON and stdout carries nothing else;
an expected error (bad input, an unusable environment) ends in one line on stderr and exit 2 (a suspect trace
could not align: 3, its verdict still printed when it could be read), Ctrl-C in exit
130, SIGTERM (unwound as Ctrl-C is) in exit 143, a reader that closed the pipe (`| head`) quietly in exit 141."""

# One module per command group adds its commands to the parser and runs them: codes, owner (registry, trace,
# attack), issue, bench, run (simulate, evaluate, demo), roster; output.py prints, args.py checks arguments. Heavy
# imports (torch, Flower, Ray) wait inside the command functions: parsing stays torch-free.

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence

from securemark.cli import bench, codes, owner, roster, run
from securemark.cli.args import show_defaults
from securemark.cli.bench import CENSORED
from securemark.cli.output import _print_json, _stdout_reserved
from securemark.cli.owner import COLLUSION_METHODS
from securemark.cli.run import RAY_HELP
from securemark.errors import SecureMarkError

__all__ = ["CENSORED", "COLLUSION_METHODS", "EXPECTED_ERRORS", "RAY_HELP", "build_parser", "main"]

# bad input or an unusable environment: one line and exit 2. SecureMarkError is every refusal securemark makes;
# OSError covers missing, existing or unwritable paths, a closed pipe and an unreachable cluster; OverflowError a
# number too large for a float; JSONDecodeError a JSON file someone else wrote or damaged (securemark writes its
# own with json.dumps); UnicodeDecodeError a file given as text that is not UTF-8. Anything else is a bug, and
# ends in its traceback.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    SecureMarkError,
    OSError,
    OverflowError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="securemark", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for group in (codes, owner, bench, run, roster):  # in the order --help lists the commands
        group.add_commands(sub)
    show_defaults(p)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds as after Ctrl-C: temporary registries and
    their owner keys removed, child processes and Ray stopped."""


def _terminate(signum: int, _frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        with _stdout_reserved(getattr(args, "json", False)):  # --json: stdout carries the JSON alone
            payload = args.func(args)
        if payload is not None:
            _print_json(payload)
            sys.stdout.flush()
    except BrokenPipeError:  # `securemark registry show | head`: the reader took what it wanted; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE reports
    except EXPECTED_ERRORS as exc:  # bad input gets one clear line, not a traceback
        # never quote the file's bytes (it may be a key)
        why = "a file given as text is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc
        print(f"securemark: error: {why}", file=sys.stderr)
        return int(getattr(exc, "exit_status", 2))
    except KeyboardInterrupt as exc:  # what the command started (a Ray instance, actors) is already stopped
        terminated = isinstance(exc, _Terminated)
        print(f"securemark: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if in_main:  # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return int(getattr(args, "exit_status", 0))  # a command's verdict may set it (trace: 3, not aligned)
