"""Every command the docs show runs, at small size, from one list: tests/commands.toml.

A command is what a code block line or an inline code span says after `securemark` (a span that only names a
command, like `securemark trace`, is a reference: it must name a real command, and needs no entry). The list
and the docs are checked against each other both ways, so a command added to the docs without a small version
here, or a command the docs dropped, fails; then each small version runs through the real CLI."""

import argparse
import json
import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from securemark import data, models
from securemark.cli import build_parser, main
from securemark.fingerprint.align import chain_groups
from securemark.modelio import load_state_dict, save_state_dict

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"]  # the docs pages whose commands are listed in commands.toml
CATALOGUE = tomllib.loads((ROOT / "tests" / "commands.toml").read_text())["command"]
COMMAND = re.compile(r"(?:\S*/)?securemark\s+\S.*")
IN_BLOCK = re.compile(r"^\s*((?:bash scripts/setup && )?(?:\S*/)?securemark\s+\S.*)")


def command_words(parser: argparse.ArgumentParser) -> set[str]:
    """The names of every command and sub-command the CLI's parser knows."""
    words: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words |= {name} | command_words(sub)
    return words


COMMAND_WORDS = command_words(build_parser())


def fold(text: str) -> str:
    return " ".join(text.split())


def spans(page: Path) -> list[str]:
    """The inline code spans of ``page`` (outside code blocks) that start with securemark, folded."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [fold(s) for s in re.findall(r"`([^`]+)`", text) if COMMAND.fullmatch(fold(s))]


def documented() -> dict[str, list[str]]:
    """Each command shown in DOCS (whitespace folded, a comment after it cut) and the pages that show it: every
    code block line that runs securemark, and every inline span that is a command, not a reference."""
    found: dict[str, list[str]] = {}
    for page in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n", "\\ ", block).splitlines():
                if m := IN_BLOCK.search(re.sub(r"\s#\s.*$", "", line)):  # a comment after the command is cut
                    found.setdefault(fold(m.group(1)), []).append(page.name)
        for span in spans(page):
            if not is_reference(span):
                found.setdefault(span, []).append(page.name)
    return found


def is_reference(cmd: str) -> bool:
    """A span like `securemark evaluate` or `securemark codes eval`: command words only."""
    words = cmd.split()[1:]
    return all(w in COMMAND_WORDS for w in words)


def entries_showing() -> dict[str, dict]:
    return {fold(s): e for e in CATALOGUE for s in e["shown"]}


def test_every_command_the_docs_show_has_a_small_version_and_nothing_stale():
    shown = set(documented())
    listed = entries_showing()
    assert sorted(shown - set(listed)) == [], "shown in the docs, missing from tests/commands.toml"
    assert sorted(set(listed) - shown) == [], "listed in tests/commands.toml, no longer in the docs"
    for entry in CATALOGUE:
        assert ("run" in entry) != ("covered_by" in entry), entry["shown"]


def test_references_name_real_commands(capsys):
    refs = [s for page in DOCS for s in spans(page) if is_reference(s)]
    assert refs  # the docs do name commands in passing
    for cmd in refs:
        with pytest.raises(SystemExit) as done:
            main([*cmd.split()[1:], "--help"])
        assert done.value.code == 0, cmd
    capsys.readouterr()


@pytest.mark.parametrize("entry", [e for e in CATALOGUE if "covered_by" in e], ids=lambda e: e["covered_by"])
def test_commands_run_elsewhere_are_run_there(entry):
    """The named test exists and runs the command it stands for."""
    path, _, name = entry["covered_by"].partition("::")
    source = (ROOT / path).read_text()
    assert re.search(rf"^def {name}\(", source, re.M), f"{entry['covered_by']} does not exist"
    for shown in entry["shown"]:
        tokens = shown.split()
        after = tokens[next(i for i, t in enumerate(tokens) if t.endswith("securemark")) + 1 :]
        words = [w for w in after[:2] if w in COMMAND_WORDS]
        assert words and all(f'"{w}"' in source for w in words), f"{entry['covered_by']} runs no {shown}"


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
    server, url = start("leak", copy, (1, 8, 8))
    yield {"reg": reg, "base": tmp / "base.pt", "copy": tmp / "ann.pt", "copy2": tmp / "bob.pt", "ts": tmp / "ann.ts",
           "queries": tmp / "queries.npz", "groups": tmp / "groups.json", "endpoint": url, "smoke": smoke,
           "qbase": tmp / "quickstart-cnn.pt"}  # fmt: skip
    server.shutdown()


RUNS = [(run, e) for e in CATALOGUE for run in ([e["run"]] if isinstance(e.get("run"), str) else e.get("run", []))]


@pytest.mark.parametrize(("run", "entry"), RUNS, ids=[r for r, _ in RUNS])
def test_the_small_version_of_each_documented_command_runs(run, entry, places, tmp_path, capsys):
    argv = [a.format(**places, tmp=tmp_path) for a in shlex.split(run)]
    code = main(argv)
    out = capsys.readouterr()
    assert code == entry.get("exit", 0), out.err[-2000:]
    if "--json" in argv:
        json.loads(out.out)
