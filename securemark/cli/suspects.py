"""``securemark trace DIR a.safetensors b.safetensors ...`` (or a folder of them): many suspects against one
registry, read once (Tracer). One line per suspect as it is traced (``--json``: one JSON object per line at
the end, the single-suspect report with ``suspect`` added, or ``suspect`` and ``error``); a suspect that
cannot be traced is said on its line and the others are still traced. Exit status: 2 when any suspect could
not be traced, else 3 when any was read unaligned or could be neither aligned nor read, else 0 (one file
named keeps the single-suspect output and statuses). Paths and errors are printed with control characters
written out: a file name is the pirate's text as much as the owner's."""

from __future__ import annotations

import argparse
from pathlib import Path

from securemark.cli.args import arch_of
from securemark.cli.issue import _progress
from securemark.cli.output import JsonLines
from securemark.errors import InputError, SecureMarkError

MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")  # securemark.modelio's (a test checks): the CLI parses torch-free

NOT_ALIGNED = 3  # trace's exit status when the suspect was read unaligned (the verdict is printed all the same)


def suspect_files(paths: list[Path]) -> list[Path]:
    """The suspects named: files as given, and every model file directly in a folder, sorted by name (a
    symlink that leads nowhere is listed, and its line says so)."""
    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.suffix in MODEL_SUFFIXES and not p.is_dir())
        if not found:
            raise InputError(f"{shown(str(path))} holds no model file ({', '.join(MODEL_SUFFIXES)})")
        out += found
    return out


def shown(text: str) -> str:
    """``text`` with control characters (newlines, ESC) written out, as Python writes them in a string."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def read_against(alignment: dict[str, object]) -> str:
    """Which bases a reading used, for a person: the base, or the mixture of bases, and the anchor aligned to."""
    mixture = alignment.get("mixture")
    if isinstance(mixture, list):
        what = "a mixture of " + ", ".join(f"{w:g} x {label}" for label, w in mixture)
    else:
        what = f"the {alignment['base']}"
    anchor = f", aligned to the {alignment['aligned_to']}" if "aligned_to" in alignment else ""
    return f"read against {what} ({alignment['bases_tried']} bases{anchor})"


def trace_many(a: argparse.Namespace, files: list[Path]) -> object:
    from securemark.fingerprint.align import load_groups
    from securemark.modelio import load_state_dict
    from securemark.registry import Registry
    from securemark.tracing.tracer import Tracer

    groups = load_groups(a.align_spec) if a.align_spec else None
    lines, statuses = JsonLines(), []
    with Registry.open(a.directory) as reg, _progress(len(files)) as bar:
        tracer = Tracer(reg, groups, aligned=not a.no_align, arch=arch_of(a))
        task = bar.add_task("tracing", total=len(files))
        for path in files:
            try:
                report = tracer.trace(load_state_dict(path), a.top, a.hard)
            except (SecureMarkError, OSError) as exc:  # this suspect only: the others are still traced
                lines.append({"suspect": str(path), "error": str(exc)})
                statuses.append(getattr(exc, "exit_status", 2))
            else:
                lines.append({"suspect": str(path), **report.to_json()})
                statuses.append(NOT_ALIGNED if not report.aligned and not a.no_align else 0)
            if not a.json:
                print(f"{shown(str(path))}: {_verdict(lines[-1])}", flush=True)  # as it is traced (the bar: stderr)
            bar.advance(task)
    a.exit_status = 2 if 2 in statuses else NOT_ALIGNED if NOT_ALIGNED in statuses else 0
    return lines if a.json else None


def _verdict(line: dict[str, object]) -> str:
    if "error" in line:
        return f"error: {shown(str(line['error']))}"
    accused = line["accused"]
    text = "accused: " + (
        ", ".join(shown(str(c)) for c in accused) if isinstance(accused, list) and accused else "nobody"
    )
    if not line["aligned"]:
        text += " (not aligned)"
    contested = line.get("contested")
    if isinstance(contested, dict) and contested:
        text += "; contested, not accused: " + ", ".join(shown(c) for c in contested)
    return text
