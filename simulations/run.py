"""Reproduce the evaluation tables: ``python simulations/run.py [NAME ...] [--set KEY=VALUE ...]``.

Each NAME is an evaluation config in simulations/configs/NAME.toml (default: all of them, in the order
below); its results go to simulations/results/NAME/ (report.md, results.json, results.csv, plots). A base
model a config names is trained first when missing (runs/quickstart, runs/uchida-base: about a minute each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from securemark.cli import RAY_HELP
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.harness import evaluate
from securemark.evaluation.outputs import rewrite

HERE = Path(__file__).resolve().parent
ORDER = ("collusion", "adversarial", "rewrite-launder", "spikes", "comparison", "robustness", "fidelity", "uchida",
         "blackbox", "blackbox-single", "corpus")  # fmt: skip
# `corpus` runs configs/corpus.toml once per model of securemark.corpus, each from its own trained run, with the
# training settings a model needs (MobileNetV2 diverged to NaN at lr 0.05; VGG-11 stayed at chance)
CORPUS = {"resnet8": [], "resnet18": [], "cifar-resnet18": [], "preact-resnet18": [], "vgg11-bn": ["train.lr=0.01"],
          "mobilenet-v2": ["train.lr=0.01"], "vit-tiny": [], "flower-net": []}  # fmt: skip


def configs(name: str, extra: list[str]) -> list[tuple[str, EvalConfig]]:
    """(label, config) of one NAME: the corpus one per model (its run, its output), the others as they are."""
    path = HERE / "configs" / f"{name}.toml"
    if name != "corpus":
        return [(name, EvalConfig.load(path, extra))]
    root = HERE.parent
    return [
        (f"corpus/{m}", EvalConfig.load(path, [
            f"source.run={root / 'runs' / f'corpus-{m}'}",
            "source.overrides=" + json.dumps([f"model.name={m}", *train]),
            f"output={HERE / 'results' / 'corpus' / m}", *extra,
        ]))
        for m, train in CORPUS.items()
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(ORDER)} (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. evaluate.trials=20")
    parser.add_argument("--replace", action="store_true", help="delete an earlier result directory first")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help=RAY_HELP)
    parser.add_argument("--report-only", action="store_true", help="redraw report.md and plots from results.json")
    args = parser.parse_args()
    unknown = set(args.names) - set(ORDER)
    if unknown:
        parser.error(f"unknown simulation {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    for name, cfg in [c for n in args.names or ORDER for c in configs(n, args.set)]:
        out = Path(cfg.output)
        if args.report_only:
            rewrite(out)
            print(f"{name}: redrew {out / 'report.md'}")
            continue
        if args.replace and out.exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        results = evaluate(cfg, out, ray_address=args.ray)
        cells = len(results["cells"]) + len(results.get("blackbox", {}).get("cells", []))
        print(f"{name}: {cells} cells in {time.perf_counter() - start:.0f} s -> {out / 'report.md'}")


if __name__ == "__main__":
    main()
