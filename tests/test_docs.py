"""Every Python block the docs show runs, as a reader would paste it: a fresh interpreter in an empty folder.

The docs' commands run from tests/commands.toml (tests/test_commands.py); the site itself is built strictly
by scripts/check (`mkdocs build --strict`: broken links, anchors and generated reference included)."""

import os
import re
import subprocess
import sys

import pytest

from tests.test_commands import DOCS, ROOT, fences

PYTHON = re.compile(r"(?i)^\{?\s*\.?(py|python3?)\b")  # ```python, ```py, ```python3, ```{.python}


def python_blocks(page):
    return [body for info, body in fences(page.read_text()) if PYTHON.match(info)]


BLOCKS = [(page, i, code) for page in DOCS for i, code in enumerate(python_blocks(page))]


def test_the_docs_show_python_blocks():
    assert len(BLOCKS) >= 2  # the README's and the tutorial's "add securemark to your Flower app"


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS, ids=[f"{p.relative_to(ROOT)}#{i}" for p, i, _ in BLOCKS])
def test_each_python_block_runs(page, index, code, tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, f"{page.name} block {index}:\n{done.stderr[-3000:]}"
