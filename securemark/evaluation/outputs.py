"""An evaluation's files: results.json, results.csv, report.md and the PNG plots it links (headless)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from securemark.evaluation.config import EvalConfig
from securemark.evaluation.stats import meets_target

CSV_FIELDS = (
    "scheme", "code", "attack", "coalition_size", "customers", "length", "budget", "trials", "catch_rate",
    "catch_low", "catch_high", "all_caught_rate", "innocents_accused", "trials_with_innocent",
    "innocent_rate_high", "accuracy", "accuracy_min", "bit_agreement", "survival", "top_colluder_score",
    "top_innocent_score", "tracing_seconds", "attack_seconds", "pipeline",
)  # fmt: skip


def rewrite(out: Path) -> None:
    """Redraw the report and plots of a finished evaluation from its files (no trial is re-run)."""
    results = json.loads((out / "results.json").read_text())
    write_outputs(out, EvalConfig.load(out / "config.toml"), results)


def write_outputs(out: Path, cfg: EvalConfig, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["cells"])
    plots: list[str | None] = []
    if results["cells"]:  # none when the evaluation holds black-box cells only
        plots += [plot_catch(results["cells"], out / "catch.png")]
        plots += [plot_survival(out / "trials.jsonl", out / "survival.png")]
    if results["fidelity_sweep"]:
        plots.append(plot_fidelity(results["fidelity_sweep"], results["global_accuracy"], out / "fidelity.png"))
    (out / "report.md").write_text(report(cfg, results, [p for p in plots if p]))


def _by(cells: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(c[key], []).append(c)
    return groups


def plot_catch(cells: list[dict[str, Any]], path: Path) -> str:
    """Per attack: catch rate (Wilson 95% bars) and the share of trials accusing an innocent, against c."""
    attacks = _by(cells, "attack")
    fig, axes = plt.subplots(2, len(attacks), figsize=(3.6 * len(attacks), 6), squeeze=False, sharey="row")
    for col, (attack, group) in enumerate(attacks.items()):
        top, bottom = axes[0][col], axes[1][col]
        for scheme, rows in _by(group, "scheme").items():
            rows = sorted(rows, key=lambda r: r["coalition_size"])
            real = [r for r in rows if r["catch_rate"] is not None]
            xs = [r["coalition_size"] for r in real]
            ys = [r["catch_rate"] for r in real]
            err = [[max(0.0, y - r["catch_low"]) for y, r in zip(ys, real, strict=True)],
                   [max(0.0, r["catch_high"] - y) for y, r in zip(ys, real, strict=True)]]  # fmt: skip
            top.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=scheme)
            bottom.plot([r["coalition_size"] for r in rows], [r["trials_with_innocent"] / r["trials"] for r in rows],
                        marker="s", label=scheme)  # fmt: skip
        top.set_title(attack, fontsize=9)
        top.set_ylim(-0.05, 1.05)
        bottom.set_ylim(-0.05, 1.05)
        bottom.set_xlabel("coalition size c")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("catch rate")
    axes[1][0].set_ylabel("trials accusing an innocent")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_survival(trials_path: Path, path: Path) -> str | None:
    """Every trial: the pirate model's accuracy against how much of the fingerprint survived in it."""
    trials = [json.loads(line) for line in trials_path.read_text().splitlines()]
    trials = [t for t in trials if t["survival"] is not None]
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    trials = [t for t in trials if t["accuracy"] is not None]  # measured on the first accuracy_trials of a cell
    if not trials:
        return None
    for (scheme, attack), group in _by([{**t, "key": (t["scheme"], t["attack"])} for t in trials], "key").items():
        ax.scatter([t["survival"] for t in group], [t["accuracy"] for t in group], s=10, alpha=0.5,
                   label=f"{scheme} / {attack}")  # fmt: skip
    missed = [t for t in trials if t["coalition_size"] > 0 and not t["caught"]]
    if missed:
        ax.scatter([t["survival"] for t in missed], [t["accuracy"] for t in missed], s=40, facecolors="none",
                   edgecolors="red", label="not caught")  # fmt: skip
    ax.set_xlim(min(0.0, min(t["survival"] for t in trials)) - 0.02, 1.02)
    ax.set_xlabel("fingerprint survival: cos(extracted code, colluders' mean code row)")
    ax.set_ylabel("accuracy after the attack")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_fidelity(sweep: list[dict[str, Any]], global_accuracy: float, path: Path) -> str:
    """Copy accuracy against the fidelity budget, with the single traitor's score after the sweep's attack."""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["budget"] for r in sweep]
    ax.plot(xs, [r["copies_mean_accuracy"] for r in sweep], marker="o", label="copies (mean)")
    ax.plot(xs, [r["copies_min_accuracy"] for r in sweep], ls="--", label="copies (min)")
    ax.axhline(global_accuracy, color="black", lw=1, label="global model")
    ax.set_xscale("log")
    ax.set_xlabel("fidelity budget: perturbation RMS / carrier RMS")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    if sweep[0]["traitor_score"] is not None:
        right = ax.twinx()
        right.plot(xs, [r["traitor_score"] for r in sweep], color="tab:red", marker="^", label="traitor score")
        right.set_ylabel("traitor's normalized score after the attack", color="tab:red")
        right.legend(loc="lower right", fontsize=8)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def report(cfg: EvalConfig, results: dict[str, Any], plots: list[str]) -> str:
    e = cfg.evaluate
    if not results["cells"]:  # black-box cells alone: none of the white-box sections apply
        lines = [
            "# securemark evaluation",
            "",
            f"Base model: `{results['source']['run']}` ({results['source']['model']} on "
            f"{results['source']['data']}), global accuracy {results['global_accuracy']:.4f}. Black-box cells "
            f"only, seed {e.seed}; {results['seconds']:.0f} s in all. Code: Tardos, L = {cfg.code.length}, "
            f"c_max = {cfg.code.max_colluders}, eps = {cfg.code.eps}; white-box budget {cfg.code.budget}.",
        ]
        return "\n".join(lines + black_box_section(cfg, results.get("blackbox", {}))) + "\n"
    lines = [
        "# securemark evaluation",
        "",
        f"Base model: `{results['source']['run']}` ({results['source']['model']} on {results['source']['data']}), "
        f"global accuracy {results['global_accuracy']:.4f}. {e.trials} trials per white-box cell, seed {e.seed}; "
        f"{results['seconds']:.0f} s in all.",
        f"Code: L = {cfg.code.length}, c_max = {cfg.code.max_colluders}, eps = {cfg.code.eps}, "
        f"white-box budget = {cfg.code.budget}, carrier {cfg.code.carrier_mode}.",
        "",
        "caught: at least one colluder accused. Intervals are Wilson 95%. c = 0 is a control: the unmarked base "
        "model under the attack, where every accusation is false. bit agreement: the share of the positions where "
        "all colluders hold the same bit that the suspect still shows (0.5 is chance); survival: cos(extracted "
        "code, the colluders' mean +-1 row), 1 for an intact copy or a plain average.",
        *(
            [f"accuracy: the attacked model's, measured on the first {e.accuracy_trials} trials of each cell."]
            if e.accuracy_trials
            else []
        ),
        "",
        "## Attacks",
        "",
        *[f"- **{name}**: `{spec}`" for name, spec in cfg.attacks.items()],
        "",
        "## Fidelity",
        "",
        "| scheme | copies | mean accuracy | min | drop vs global (pp) |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {k} | {v['copies']} | {v['copies_mean_accuracy']:.4f} | {v['copies_min_accuracy']:.4f} "
          f"| {v['drop_pp']:+.2f} |" for k, v in results["fidelity"].items()],
        "",
        "## Cells",
        "",
        "| scheme | attack | c | n | trials | catch rate [95%] | all caught | innocents accused | accuracy "
        "| bit agreement | survival | trace s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for c in results["cells"]:
        catch = "n/a"
        if c["catch_rate"] is not None:
            catch = f"{c['catch_rate']:.3f} [{c['catch_low']:.3f}, {c['catch_high']:.3f}]"
        lines.append(
            f"| {c['scheme']} | {c['attack']} | {c['coalition_size']} | {c['customers']} | {c['trials']} | {catch} "
            f"| {_pct(c['all_caught_rate'])} | {c['innocents_accused']} | {_pct(c['accuracy'])} "
            f"| {_pct(c['bit_agreement'])} | {_pct(c['survival'])} | {c['tracing_seconds']:.4f} |"
        )
    missing = [c for c in results["cells"] if not meets_target(c)]
    lines += ["", "## Below target (catch rate >= 0.99 and no innocent accused)", ""]
    lines += [
        f"- {c['scheme']} / {c['attack']} / c = {c['coalition_size']}: catch {_pct(c['catch_rate'])}, "
        f"{c['innocents_accused']} innocent accusations in {c['trials']} trials"
        for c in missing
    ] or ["Every cell meets it."]
    if "blackbox" in results:
        lines += black_box_section(cfg, results["blackbox"])
    if results["fidelity_sweep"]:
        lines += ["", "## Fidelity against strength", "",
                  "| budget | strength | copies mean acc | min | drop (pp) | traitor score | bit error | caught |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in results["fidelity_sweep"]:
            lines.append(
                f"| {r['budget']} | {r['strength']:.4g} | {r['copies_mean_accuracy']:.4f} | "
                f"{r['copies_min_accuracy']:.4f} | {r['drop_pp']:+.2f} | {_pct(r['traitor_score'])} "
                f"| {_pct(None if r['bit_agreement'] is None else 1 - r['bit_agreement'])} | {_pct(r['catch_rate'])} |"
            )
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def black_box_section(cfg: EvalConfig, bb: dict[str, Any]) -> list[str]:
    """The black-box cells: fidelity of copies carrying both marks, each cell, the innocent tail."""
    b, f, tail = cfg.blackbox, bb["fidelity"], bb["innocent_tail"]
    lines = [
        "", "## Black-box cells", "",
        f"Copies carry both marks (function mark budget {b.budget}, capacity {bb['capacity']} directions). Suspects "
        f"are traced through their outputs alone: {b.queries} queries (intact copies over HTTP: 2000), the "
        f"owner's held-out data and its shifts. Students distill for {b.epochs} epochs on the training pool; "
        "a control is a student of the unmarked model. leader/threshold: the best pirate's score over the "
        "certified threshold (median over trials; >= 1 is caught).", "",
        f"Fidelity ({f['copies']} copies): accuracy against the global model's {-100 * f['accuracy_drop_mean']:+.2f} "
        f"pp mean, {-100 * f['accuracy_drop_max']:+.2f} pp worst; top-1 agreement with the global model "
        f"{f['agreement_mean']:.4f} mean, {f['agreement_min']:.4f} worst.", "",
        "| cell | trials | catch | innocents accused | student accuracy | leader/threshold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for c in bb["cells"]:
        lines.append(f"| {c['name']} | {c['trials']} | {_pct(c['catch'])} | {c['innocents_accused']} "
                     f"| {_pct(c['student_accuracy'])} | {_pct(c['leader_over_threshold'])} |")  # fmt: skip
    for t in bb.get("trigger_baseline", []):
        argmax = "" if t["argmax_names_a_pirate"] is None else f" (argmax names a pirate {t['argmax_names_a_pirate']})"
        lines.append(f"| {t['name']} ({t['queries']} queries) | {t['trials']} | {_pct(t['catch'])}{argmax}"
                     f" | {t['innocents_accused']} "
                     f"| {_pct(t['suspect_accuracy'])} | |")  # fmt: skip
    lines += [
        "", f"Innocent tail: {tail['scores']} innocent scores, {tail['over_threshold']} above their certified "
        f"threshold (the bound allows eps/n = {tail['eps_per_customer']:.1e} each); the largest is "
        f"{tail['max_over_threshold']:.3f} of its threshold. By suspect: "
        + "; ".join(f"{k}: {v[0]} suspects, {v[1]} scores" for k, v in tail["by_suspect"].items()) + ".",
    ]  # fmt: skip
    return lines
