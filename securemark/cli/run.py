"""The commands that run from a config: simulate (federated training on Flower's simulation engine),
evaluate (traitor tracing under attack and collusion) and demo (the quickstart)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from securemark.cli.args import _config_command, _natural
from securemark.errors import InputError, RunFailed

RAY_HELP = "run trials as Ray tasks: local (this machine's cores, the default), auto or ray://host:port (a cluster)"


def cmd_simulate(a: argparse.Namespace) -> None:
    from securemark.config import SimConfig
    from securemark.sim import simulate

    if (a.config is None) == (a.resume is None):
        raise InputError("give CONFIG, or --resume DIR (a run that stopped early), not both")
    if a.resume is not None:  # the run's own config, as it wrote it
        out = Path(a.resume)
        if not (out / "config.toml").is_file():
            raise InputError(f"{out} holds no run to resume (no config.toml)")
        cfg = SimConfig.load(out / "config.toml", a.set)
    else:
        cfg = SimConfig.load(a.config, a.set)
        out = Path(a.out or cfg.output)
    metrics = simulate(cfg, out, resume=a.resume is not None)
    if not any(m["status"] == "completed" for m in metrics["rounds"]):  # a run that trained nothing is no success
        reasons = sorted({str(m.get("reason", "?")) for m in metrics["rounds"]})
        raise RunFailed(f"no round of {len(metrics['rounds'])} completed ({'; '.join(reasons)}); outputs in {out}")
    last = metrics["rounds"][-1]
    print(
        f"done: {len(metrics['rounds'])} rounds, final global accuracy {last['global_accuracy']:.4f}; outputs in {out}"
    )


def cmd_evaluate(a: argparse.Namespace) -> None:
    if a.ray is not None:  # the actors start importing torch while this process does the same
        from securemark.config import check_ray_option
        from securemark.flower.ray_trials import prestart

        check_ray_option(a.ray)
        prestart(a.ray)
    from securemark.evaluation.config import EvalConfig
    from securemark.evaluation.harness import evaluate
    from securemark.evaluation.stats import meets_target

    sources = [f"source.{k}={json.dumps(str(v))}" for k, v in (("run", a.run), ("data", a.data)) if v is not None]
    cfg = EvalConfig.load(a.config, [*a.set, *sources])
    out = Path(a.out or cfg.output)
    results = evaluate(cfg, out, ray_address=a.ray)
    cells = results["cells"]
    below = sum(not meets_target(c) for c in cells)
    done = f"done: {len(cells)} white-box cells, {below} below target (catch >= 0.99, no innocent)"
    if "blackbox" in results:
        bb = [c for c in results["blackbox"]["cells"] if c["catch"] is not None]
        done += f"; {len(results['blackbox']['cells'])} black-box cells, {sum(c['catch'] < 0.99 for c in bb)} below"
    print(f"{done}; report: {out / 'report.md'}")


def cmd_demo(a: argparse.Namespace) -> None:
    if a.owner:  # the owner workflow alone: no federation, ~10 s
        from securemark.demo import main as demo_main

        demo_main(a.out, a.seed)
        return
    from rich.console import Console

    from securemark.config import SimConfig
    from securemark.quickstart import print_quickstart, run_quickstart

    cfg = SimConfig.load(_find_config(a.config))
    out = Path(a.out) if a.out else _fresh_dir(Path(cfg.output))
    console = Console()
    print_quickstart(run_quickstart(cfg, out, a.seed, console), console)


def _find_config(path: Path) -> Path:
    """``path`` as given, else inside the source checkout (an editable install run from elsewhere)."""
    if path.exists() or path.is_absolute():
        return path
    beside = Path(__file__).resolve().parents[2] / path
    return beside if beside.exists() else path


def _fresh_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``... : the first that holds no run yet."""
    candidate, n = base, 1
    while (candidate / "metrics.json").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """simulate, evaluate and demo, in the order --help lists them."""
    sim = _config_command(sub, "simulate", "federated training on Flower's simulation engine (Ray)", "train.rounds=3")
    sim.add_argument("--resume", type=Path, default=None, metavar="DIR", help="go on with the run in DIR from its "
                     "last completed round (same registry, key and strength; its own config.toml)")  # fmt: skip
    sim.set_defaults(func=cmd_simulate)

    about = "traitor tracing under attack and collusion: trials, report, plots"
    ev = _config_command(sub, "evaluate", about, "evaluate.trials=50")
    ev.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help=RAY_HELP)
    ev.add_argument(
        "--run",
        type=Path,
        default=None,
        metavar="DIR",
        help="the run to evaluate (source.run): a simulate run, or one your own Flower app made",
    )
    ev.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="X.npz",
        help="an app's run: its held-out data, arrays x (N,C,H,W) and y (labels) (source.data)",
    )
    ev.set_defaults(func=cmd_evaluate)

    demo = sub.add_parser("demo", help="quickstart: federated training, then a laundered leak traced to its customer")
    demo.add_argument("--config", type=Path, default=Path("configs/quickstart.toml"), help="the run's TOML config")
    demo.add_argument("--out", default=None, help="run directory (default: the config's output, made unique)")
    demo.add_argument("--seed", type=_natural, default=0, help="chooses the leaking customer")
    demo.add_argument("--owner", action="store_true", help="the owner workflow alone on digits: no federation")
    demo.set_defaults(func=cmd_demo)
