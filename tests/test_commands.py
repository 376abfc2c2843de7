"""Every command the docs show runs, at small size, from one list: tests/commands.toml.

A command is a code block line that runs securemark (a `$ ` prompt, `python -m`, `VAR=1` prefixes allowed),
or an inline code span that parses as a whole command. A span that only names one (`securemark trace`) is a
reference: it must be exactly a command of the parser. Any other mention of `securemark <command>` in a page
(an indented block, HTML, an unknown fence) fails, so nothing escapes the list. The list and the docs are
checked against each other both ways; each entry's small versions must run the command words and long flags
it shows (a flag left out says so in `not_run`); then each small version runs through the real CLI."""

import argparse
import ast
import contextlib
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from securemark import data, models
from securemark.cli import build_parser, main
from securemark.fingerprint.align import chain_groups
from securemark.modelio import load_state_dict, save_state_dict

ROOT = Path(__file__).resolve().parents[1]
# the docs pages whose commands are listed in commands.toml: the README, the site's pages and the evaluation
# tables the site includes (docs/experiments/collusion.md includes simulations/README.md at build time)
EXAMPLES = [ROOT / "examples" / name / "README.md" for name in ("flower-pytorch", "flower-resnet")]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "simulations" / "README.md", *EXAMPLES]
LISTS = tomllib.loads((ROOT / "tests" / "commands.toml").read_text())
CATALOGUE, OTHER = LISTS["command"], LISTS["other"]  # securemark commands; the docs' other shell lines
PREFIX = r"(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3? -m |\S*/)?"  # a prompt, VAR=1, python -m, a path
COMMAND = re.compile(rf"{PREFIX}securemark(?:\.cli)?\s+\S.*")  # python -m securemark(.cli) runs the same
IN_BLOCK = re.compile(rf"^\s*((?:bash scripts/setup && )?{PREFIX}securemark(?:\.cli)?\s+\S.*)")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n(.*?)^ {0,3}\1[ \t]*$", re.M | re.S)
SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def command_tree(parser: argparse.ArgumentParser) -> dict[str, dict]:
    """The parser's commands and sub-commands as a nested dict of names."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: command_tree(sub) for name, sub in action.choices.items()}
    return {}


TREE = command_tree(build_parser())
MENTION = re.compile(rf"securemark\s+({'|'.join(TREE)})\b")


def fold(text: str) -> str:
    return " ".join(text.split())


def words_of(cmd: str) -> list[str]:
    """The command words after `securemark` (e.g. ["bench", "rounds"]), as deep as the parser's tree goes."""
    tokens = cmd.split()
    after = tokens[next(i for i, t in enumerate(tokens) if t.endswith(("securemark", "securemark.cli"))) + 1 :]
    words, level = [], TREE
    for token in after:
        if token not in level:
            break
        words.append(token)
        level = level[token]
    return words


def is_reference(cmd: str) -> bool:
    """A span that names a command and does not run one: `securemark evaluate`, `securemark codes eval`."""
    words = cmd.split()[cmd.split().index("securemark") + 1 :] if "securemark" in cmd.split() else []
    if not words or words != words_of(cmd):
        return False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(words)  # a command that runs as it is shown (`securemark bench align`)
    except SystemExit:
        return True
    return False


def spans(text: str) -> list[str]:
    return [fold(s) for s in SPAN.findall(FENCE.sub("", text)) if COMMAND.fullmatch(fold(s))]


def fences(text: str) -> Iterator[tuple[str, str]]:
    """(info string, body) of every fenced block of a page: ```bash gives "bash"."""
    for m in FENCE.finditer(text.replace("\r\n", "\n")):
        yield m.group(0).split("\n", 1)[0].strip().lstrip("`~").strip(), m.group(2)


def block_lines(body: str) -> list[str]:
    """A block's lines, backslash continuations joined, a comment after a line cut."""
    return [re.sub(r"\s#\s.*$", "", line) for line in re.sub(r"\\\n", "\\ ", body).splitlines()]


def documented() -> dict[str, list[str]]:
    """Each command shown in DOCS (whitespace folded, a comment after it cut) and the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in DOCS:
        text = page.read_text().replace("\r\n", "\n")
        for _, body in fences(text):
            for line in block_lines(body):
                if m := IN_BLOCK.search(line):
                    found.setdefault(fold(m.group(1)), []).append(page.name)
        for span in spans(text):
            if not is_reference(span):
                found.setdefault(span, []).append(page.name)
    return found


def references() -> list[str]:
    return [s for page in DOCS for s in spans(page.read_text()) if is_reference(s)]


def entries_showing() -> dict[str, dict]:
    return {fold(s): e for e in CATALOGUE for s in e["shown"]}


def runs_of(entry: dict) -> list[str]:
    run = entry.get("run", [])
    return [run] if isinstance(run, str) else list(run)


def test_every_command_the_docs_show_has_a_small_version_and_nothing_stale():
    shown = set(documented())
    listed = entries_showing()
    assert sorted(shown - set(listed)) == [], "shown in the docs, missing from tests/commands.toml"
    assert sorted(set(listed) - shown) == [], "listed in tests/commands.toml, no longer in the docs"
    assert sum(len(e["shown"]) for e in CATALOGUE) == len(listed), "a spelling listed by two entries"


SHELL = ("bash", "sh", "shell", "console")


def shell_lines() -> dict[str, list[str]]:
    """The lines of the docs' shell blocks that are not securemark commands, and the pages that show them."""
    found: dict[str, list[str]] = {}
    for page in DOCS:
        for info, body in fences(page.read_text()):
            if info.split()[:1] not in [[s] for s in SHELL]:
                continue
            for line in map(fold, block_lines(body)):
                if line and not line.startswith("#") and not IN_BLOCK.search(line):
                    found.setdefault(line, []).append(page.name)
    return found


def test_every_other_shell_line_is_run_elsewhere_or_skipped_with_its_reason():
    listed = {fold(s): e for e in OTHER for s in e["shown"]}
    shown = shell_lines()
    assert sorted(set(shown) - set(listed)) == [], "shell lines in the docs missing from tests/commands.toml"
    assert sorted(set(listed) - set(shown)) == [], "listed in tests/commands.toml, no longer in the docs"
    for entry in OTHER:
        assert ("covered_by" in entry) != ("skip" in entry), f"{entry['shown'][0]}: covered_by or skip"


@pytest.mark.parametrize("entry", OTHER, ids=lambda e: e["shown"][0][:60])
def test_other_shell_lines_run_in_the_test_named(entry):
    """A line run by another test names one that exists; a skipped one is reported as skipped, reason given."""
    if "skip" in entry:
        pytest.skip(entry["skip"])
    path, _, name = entry["covered_by"].partition("::")
    tree = ast.parse((ROOT / path).read_text())
    assert any(isinstance(f, ast.FunctionDef) and f.name == name for f in ast.walk(tree)), entry["covered_by"]


def test_no_mention_of_a_command_escapes_the_extraction():
    """Outside the fences and spans read above (an indented block, HTML, a prompt the prefixes miss), a page
    names no command; inside any fence, whatever its language, a line that names one is read as a command
    (`cd runs && securemark trace`, `(.venv) $ securemark ...` are not); a span that names one is a whole
    command or a reference (`time securemark bench` is neither). Each would be a command that nothing runs."""
    for page in DOCS:
        text = page.read_text()
        rest = SPAN.sub("", FENCE.sub("", text))
        assert MENTION.findall(rest) == [], f"{page.name}: a command outside a code block or span"
        for _, body in fences(text):
            for line in block_lines(body):
                assert not MENTION.search(line) or IN_BLOCK.search(line), f"{page.name}: unread command: {line}"
        for span in SPAN.findall(FENCE.sub("", text)):
            span = fold(span)
            assert not MENTION.search(span) or COMMAND.fullmatch(span), f"{page.name}: unread command: {span}"


def test_each_small_version_runs_what_its_entry_shows():
    """Every command of a shown line (split at |, && and ;) has a run with its command words; every long flag
    it shows outside [brackets] appears in a run, or in the entry's not_run with the reason."""
    for entry in CATALOGUE:
        runs = runs_of(entry)
        assert bool(runs) != ("covered_by" in entry), f"{entry['shown']}: a non-empty run, or covered_by"
        if entry.get("exit", 0) != 0:
            assert entry.get("stderr"), f"{entry['shown']}: an expected failure names what it expects"
        if not runs:
            continue
        ran = [["securemark", *shlex.split(r)] for r in runs]
        for shown in entry["shown"]:
            for part in re.split(r"\s(?:\||&&|;)\s", shown):
                part = part if "securemark" in part else f"securemark {part}"
                words = words_of(part)
                if not words:
                    continue  # bash scripts/setup
                assert any(r[1 : 1 + len(words)] == words for r in ran), f"nothing runs {' '.join(words)}"
                flags = set(re.findall(r"(?<![\[\w-])--[a-z][\w-]*", re.sub(r"\[[^\]]*\]", "", part)))
                missing = flags - {a for r in ran for a in r} - set(entry.get("not_run", []))
                assert not missing, f"{part}: no small version passes {sorted(missing)}"


def test_references_name_real_commands():
    refs = references()
    assert refs  # the README does name commands in passing
    for cmd in refs:
        words = cmd.split()[1:]
        level = TREE
        for w in words:  # exactly a path of the parser's tree, nothing left over
            assert w in level, f"{cmd}: {w!r} is no command here"
            level = level[w]


@pytest.mark.parametrize("entry", [e for e in CATALOGUE if "covered_by" in e], ids=lambda e: e["covered_by"])
def test_commands_run_elsewhere_are_run_there(entry):
    """The named test exists and calls the CLI (main or the securemark binary) with the command words and
    every long flag each spelling shows."""
    path, _, name = entry["covered_by"].partition("::")
    tree = ast.parse((ROOT / path).read_text())
    found = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == name]
    assert found and name.startswith("test_"), f"{entry['covered_by']} is no test"
    literals = {n.value for n in ast.walk(found[0]) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    for shown in entry["shown"]:
        flags = set(re.findall(r"(?<![\[\w-])--[a-z][\w-]*", re.sub(r"\[[^\]]*\]", "", shown)))
        assert {*words_of(shown), *flags} <= literals, f"{entry['covered_by']} runs no {shown}"


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """What the small versions work on: a registry whose copies carry both marks (made through the CLI, as the
    docs say), two copies, a TorchScript file, query inputs, an align spec, a served copy."""
    from securemark.tracing.serve import start

    tmp = tmp_path_factory.mktemp("commands")
    model = models.build("cnn", (1, 8, 8), 10, seed=3)
    save_state_dict(model.state_dict(), tmp / "base.pt")
    reg, smoke = tmp / "reg", str(ROOT / "configs" / "smoke.toml")
    assert main(["registry", "init", str(reg), "--length", "256", "--max-colluders", "3", "--exclude", "head.3.*"]) == 0
    for name in ("ann", "bob"):
        argv = ["issue", str(reg), "--model", str(tmp / "base.pt"), "--customer", name, "--config", smoke]
        assert main([*argv, "--out", str(tmp / f"{name}.pt")]) == 0
    copy = models.load_weights(models.build("cnn", (1, 8, 8), 10), load_state_dict(tmp / "ann.pt")).eval()
    torch.jit.save(torch.jit.script(copy), str(tmp / "ann.ts"))
    held = data.load("digits", 0).split(0.3, 0)[1].x.numpy()
    np.savez(tmp / "queries.npz", x=held[:300])
    (tmp / "groups.json").write_text(json.dumps([g.to_json() for g in chain_groups(model.state_dict())]))
    torch.save(models.build("cnn", (1, 28, 28), 10, seed=0).state_dict(), tmp / "quickstart-cnn.pt")
    (tmp / "names.txt").write_text("cy\ndi\n")
    assert main(["roster", "init", "alice,bob", "--out", str(tmp / "roster")]) == 0
    server, url = start("leak", copy, (1, 8, 8))
    yield {"reg": reg, "base": tmp / "base.pt", "copy": tmp / "ann.pt", "copy2": tmp / "bob.pt", "ts": tmp / "ann.ts",
           "queries": tmp / "queries.npz", "groups": tmp / "groups.json", "endpoint": url, "smoke": smoke,
           "qbase": tmp / "quickstart-cnn.pt", "names": tmp / "names.txt", "roster": tmp / "roster"}  # fmt: skip
    server.shutdown()


RUNS = [(run, e) for e in CATALOGUE for run in runs_of(e)]


@pytest.mark.parametrize(("run", "entry"), RUNS, ids=[r for r, _ in RUNS])
def test_the_small_version_of_each_documented_command_runs(run, entry, places, tmp_path, capsys):
    argv = [a.format(**places, tmp=tmp_path) for a in shlex.split(run)]
    code = main(argv)
    out = capsys.readouterr()
    assert code == entry.get("exit", 0), out.err[-2000:]
    assert entry.get("stderr", "") in out.err
    if "--json" in argv:
        result = json.loads(out.out)
        for left, right in entry.get("json_equal", []):  # e.g. every copy carries the function mark
            assert dig(result, left) == dig(result, right), (left, right, out.out[-2000:])


def dig(result: dict, path: str) -> object:
    for key in path.split("."):
        result = result[key]
    return result
