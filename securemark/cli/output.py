"""What a command prints: strict JSON for --json (stdout kept for it alone while the command runs), or rich
tables for a person."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import numpy as np


def _strict(obj: object) -> object:
    """NaN and infinities -> None, numpy scalars -> floats: what --json prints is always strict JSON."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


class JsonLines(list[dict[str, object]]):
    """A command's --json result printed as one compact JSON object per line (``trace`` of many suspects)."""


def _print_json(obj: object) -> None:
    if isinstance(obj, JsonLines):
        for item in obj:
            print(json.dumps(_strict(item), allow_nan=False, default=float))
        return
    print(json.dumps(_strict(obj), indent=2, allow_nan=False, default=float))


def _json_or_table(a: argparse.Namespace, result: dict[str, object], *tables: dict[str, object]) -> object:
    """``result`` for main to print as JSON under --json, else shown here as ``tables`` (default: ``result``
    as one table)."""
    if a.json:
        return result
    for rows in tables or (result,):
        _table(rows)
    return None


@contextmanager
def _stdout_reserved(reserve: bool) -> Iterator[None]:
    """With ``reserve``, stdout is kept for the JSON main prints afterwards: while the command runs, whatever
    else would reach stdout goes to stderr instead. Python prints and rich consoles see sys.stdout swapped;
    when stdout is a real file descriptor, it is also pointed at stderr's, so Flower's and Ray's output (their
    handlers hold the old stream, some write from threads or native code) follows."""
    if not reserve:
        yield
        return
    real = sys.stdout
    if real is None:
        raise OSError("stdout is closed: --json has nowhere to write")
    real.flush()
    try:
        fd = real.fileno()
    except (OSError, ValueError, AttributeError):  # a test's capture object: no descriptor to move
        fd = -1
    saved = os.dup(fd) if fd >= 0 else -1
    if fd >= 0:
        os.dup2(sys.stderr.fileno(), fd)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        # whatever was written meanwhile through a cached stdout object or C stdio goes out while fd 1 still
        # points at stderr
        real.flush()
        sys.stderr.flush()
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)
        sys.stdout = real
        if fd >= 0:
            os.dup2(saved, fd)
            os.close(saved)


def _table(rows: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False)
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)
