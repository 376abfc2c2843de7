"""MkDocs hook: the reference pages' generated parts, written from the code at build time.

``<!-- generated:cli -->`` becomes every command of ``securemark.cli.build_parser()`` with its options (flags,
default, choices, help); ``<!-- generated:config -->`` and ``<!-- generated:evaluate-config -->`` become every
key of the run and evaluation configs, from the dataclasses' fields and the comment beside each. Nothing in
these parts is written by hand, so they cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any


def on_page_markdown(markdown: str, **_: Any) -> str:
    if "<!-- generated:cli -->" in markdown:
        markdown = markdown.replace("<!-- generated:cli -->", cli_reference())
    if "<!-- generated:config -->" in markdown:
        from securemark.config import SimConfig

        markdown = markdown.replace("<!-- generated:config -->", config_reference(SimConfig))
    if "<!-- generated:evaluate-config -->" in markdown:
        from securemark.evaluation.config import EvalConfig

        markdown = markdown.replace("<!-- generated:evaluate-config -->", config_reference(EvalConfig))
    return markdown


# --- the command line ------------------------------------------------------------------------------------
def cli_reference() -> str:
    from securemark.cli import build_parser

    out: list[str] = []
    _commands(build_parser(), ["securemark"], out)
    return "\n".join(out)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _commands(parser: argparse.ArgumentParser, path: list[str], out: list[str]) -> None:
    sub = _subparsers(parser)
    if sub is None:
        out += [f"## {' '.join(path)}", "", parser.description or "", "", "```text",
                parser.format_usage().strip().removeprefix("usage: "), "```", "", *_options(parser), ""]  # fmt: skip
        return
    for name, child in sub.choices.items():
        child.description = child.description or next((a.help for a in sub._choices_actions if a.dest == name), "")
        _commands(child, [*path, name], out)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | help |", "| --- | --- | --- |"]
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        name = ", ".join(a.option_strings) or a.dest
        if a.choices and not isinstance(a, argparse._SubParsersAction):
            name += " {" + ",".join(str(c) for c in a.choices) + "}"
        default = "" if a.default in (None, argparse.SUPPRESS) or a.required else f"`{a.default}`"
        if isinstance(a, argparse._StoreTrueAction):
            default = ""
        help_text = (a.help or "").replace("|", "\\|").replace("\n", " ") % {"default": a.default}
        rows.append(f"| `{name}` | {default} | {help_text} |")
    return rows if len(rows) > 2 else []


# --- configs ---------------------------------------------------------------------------------------------
def config_reference(root: type) -> str:
    out: list[str] = []
    top = [f for f in dataclasses.fields(root) if not dataclasses.is_dataclass(_type_of(f))]
    if top:
        out += _table(root, "", top)
    for f in dataclasses.fields(root):
        section = _type_of(f)
        if dataclasses.is_dataclass(section):
            out += [f"## [{f.name}]", "", _summary(section), ""]
            out += _table(section, f"{f.name}.", dataclasses.fields(section))
    return "\n".join(out)


def _summary(cls: type) -> str:
    """The first paragraph of the class's own docstring; nothing for the signature dataclass writes in its place."""
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc.split("\n\n")[0]


def _toml(value: Any) -> str:
    """A default as a TOML file writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}" if value else "{}"
    return repr(value)


def _type_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return type(f.default_factory())  # type: ignore[misc]
    return None


def _table(cls: type, prefix: str, fields: Any) -> list[str]:
    notes = _comments(cls)
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in fields:
        if f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        shown = f"`{_toml(default)}`".replace("|", "\\|") if default != "(required)" else default
        note = notes.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {shown} | {note} |")
    return [*rows, ""]


def _comments(cls: type) -> dict[str, str]:
    """The comment beside each field in the class's source (``name: type = default  # comment``), or the comment
    lines right above it."""
    found, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s+#\s*(.*)$", line):
            above.append(m.group(1))
            continue
        if m := re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line):
            note = m.group(2) or " ".join(above)
            if note:
                found[m.group(1)] = note
        above = []
    return found
