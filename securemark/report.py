"""report.md and accuracy.png for a run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from securemark.config import SimConfig


def plot_accuracy(rounds: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [m["round"] for m in rounds]
    ax.plot(xs, [m["global_accuracy"] for m in rounds], marker="o", label="global model")
    if rounds and "copies_mean_accuracy" in rounds[0]:
        ax.plot(xs, [m["copies_mean_accuracy"] for m in rounds], marker="s", label="fingerprinted copies (mean)")
        ax.plot(xs, [m["copies_min_accuracy"] for m in rounds], ls="--", label="fingerprinted copies (min)")
    failed = [m["round"] for m in rounds if m["status"] != "completed"]
    for r in failed:
        ax.axvline(r, color="red", alpha=0.3)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, cfg: SimConfig, rounds: list[dict[str, Any]]) -> None:
    plot_accuracy(rounds, out / "accuracy.png")
    last = rounds[-1] if rounds else {}
    lines = [
        "# securemark run",
        "",
        f"{cfg.train.clients} clients ({cfg.data.name}, {cfg.data.partition}), {cfg.model.name}, "
        f"{cfg.train.rounds} rounds of {cfg.train.per_round}; "
        f"fingerprint {'on' if cfg.fingerprint.enabled else 'off'}, "
        f"masked aggregation {'on (' + cfg.secagg.graph + ')' if cfg.secagg.enabled else 'off'}.",
        "",
        f"Final global accuracy: {last.get('global_accuracy', float('nan')):.4f}",
    ]
    if "copies_mean_accuracy" in last:
        lines.append(
            f"Fingerprinted copies (last round): mean {last['copies_mean_accuracy']:.4f}, "
            f"min {last['copies_min_accuracy']:.4f}; max bit error {last['max_bit_error']:.4f}"
        )
    lines += [
        "",
        "![accuracy](accuracy.png)",
        "",
        "| round | status | global acc | copies acc | bit error | survived | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in rounds:
        lines.append(
            f"| {m['round']} | {m['status']} | {m['global_accuracy']:.4f} "
            f"| {m.get('copies_mean_accuracy', float('nan')):.4f} "
            f"| {m.get('max_bit_error', float('nan')):.4f} | {m.get('survived', '')}/{m['sampled']} | {m['seconds']} |"
        )
    failed = [m for m in rounds if m["status"] != "completed"]
    if failed:
        lines += ["", "Failed rounds (model unchanged):"] + [f"- round {m['round']}: {m['reason']}" for m in failed]
    (out / "report.md").write_text("\n".join(lines) + "\n")
