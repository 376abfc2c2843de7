"""securemark bench: the benchmarks that print figures (tracing, masked aggregation, rounds, a deployment,
alignment, the black-box mark, censored servers, a whole federation), as tables or --json."""

from __future__ import annotations

import argparse
from pathlib import Path

from securemark.cli.args import _config_command, _finite, _natural, _nonnegative, _positive, add_json, add_seed
from securemark.cli.output import _json_or_table
from securemark.cli.run import _fresh_dir

# the CLI parses without importing torch: a test checks this equals securemark.bench.censored.CENSORS
CENSORED = ("rounded", "rounded-2", "float16", "clamp", "top3", "top3-renormalized", "top-k varying")


def cmd_bench_trace(a: argparse.Namespace) -> object:
    from securemark.bench.trace import bench_trace

    result = bench_trace(a.users, a.length, a.max_colluders, a.repeats, a.seed)
    return _json_or_table(a, result)


def cmd_bench_secagg(a: argparse.Namespace) -> object:
    from securemark.bench.secagg import bench_secagg

    result = bench_secagg(a.clients, a.params, a.dropout, a.graph, a.seed, a.threat)
    shown = {
        k: v for k, v in result.items() if k not in ("stage_seconds", "prg_bytes_per_second", "mask_bytes_per_second")
    }
    shown["prg_MB_per_second"] = result["prg_bytes_per_second"] / 1e6
    shown["mask_MB_per_second"] = result["mask_bytes_per_second"] / 1e6
    return _json_or_table(a, result, shown | result["stage_seconds"])


def cmd_bench_rounds(a: argparse.Namespace) -> object:
    from securemark.bench.rounds import bench_rounds

    result = bench_rounds(a.clients, a.params, a.rounds, a.seed, a.repeats)
    shown = {k: v for k, v in result.items() if k not in ("per_round_seconds", "stage_seconds")}
    stages = {f"{v}_{s}_seconds": t for v, by in result["stage_seconds"].items() for s, t in by.items()}
    return _json_or_table(a, result, shown | stages)


def cmd_bench_deploy(a: argparse.Namespace) -> object:
    from securemark.bench.deploy import bench_deploy

    result = bench_deploy(a.app, a.nodes, a.rounds, a.grace, a.isolation)
    runs = [{"run": k, **{f: str(v[f]) for f in ("per_round_seconds", "survived")}} for k, v in result["runs"].items()]
    return _json_or_table(a, result, {k: v for k, v in result.items() if k != "runs"}, *runs)


def cmd_bench_trace_rounds(a: argparse.Namespace) -> object:
    from securemark.bench.trace_rounds import bench_trace_rounds

    result = bench_trace_rounds(
        a.model, a.params, a.rounds, a.customers, a.per_round, a.anchor_every, a.length, a.max_colluders,
        a.copies, a.trials, a.timed, a.seed,
    )  # fmt: skip
    flat = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
    mixed = [{"cell": k, **result[k]} for k in ("mixed_first_and_last", "mixed_three_rounds", "mixed_extrapolated")]
    series: dict[str, object] = {
        f"after {p['rounds']} rounds": f"{p['registry_bytes']:,} bytes, trace {p['trace_seconds']} s"
        for p in result["against_rounds"]
    }
    return _json_or_table(a, result, flat | result["named_alone"], series, *mixed)


def cmd_bench_starts(a: argparse.Namespace) -> object:
    from securemark.bench.starts import bench_starts

    result = bench_starts(tuple(a.partitions), tuple(a.per_round), a.rounds, a.lr, a.seed)
    runs: list[dict[str, object]] = result["runs"]
    return _json_or_table(a, result, {k: v for k, v in result.items() if k != "runs"}, *runs)


def cmd_bench_align(a: argparse.Namespace) -> object:
    from securemark.bench.align import bench_align

    result = bench_align(a.repeats, a.budget, a.seed, large=not a.small)
    models: list[dict[str, object]] = result["models"]  # type: ignore[assignment]
    return _json_or_table(a, result, *models)


def cmd_bench_blackbox(a: argparse.Namespace) -> object:
    from securemark.bench.blackbox import bench_blackbox
    from securemark.evaluation.blackbox import students_of

    result = bench_blackbox(
        customers=a.customers, trials=a.trials, copies=a.copies, colluders=tuple(a.colluders),
        students=[] if a.no_students else students_of(tuple(a.archs), tuple(a.temperatures), not a.no_hard),
        budget=a.budget,
        epochs=a.epochs, queries=a.queries, seed=a.seed, base=a.base, triggers=a.triggers, tail=a.tail,
        noise=tuple(a.noise),
    )  # fmt: skip
    cells: list[dict[str, object]] = result["cells"]  # type: ignore[assignment]
    baseline: list[dict[str, object]] = result.get("trigger_baseline", [])  # type: ignore[assignment]
    head = {k: v for k, v in result.items() if k not in ("cells", "fidelity", "innocent_tail", "trigger_baseline")}
    tables = [head, result["fidelity"], result["innocent_tail"], *cells, *baseline]
    return _json_or_table(a, result, *tables)  # type: ignore[arg-type]


def cmd_bench_censored(a: argparse.Namespace) -> object:
    from securemark.bench.censored import bench_censored

    result = bench_censored(tuple(a.archs), a.seeds, tuple(a.served), a.queries)
    cells: list[dict[str, object]] = result["cells"]
    return _json_or_table(a, result, {k: v for k, v in result.items() if k != "cells"}, *cells)


def cmd_bench_simulate(a: argparse.Namespace) -> object:
    from securemark.bench.simulate import bench_simulate
    from securemark.config import SimConfig

    cfg = SimConfig.load(a.config, a.set)
    out = Path(a.out) if a.out else _fresh_dir(Path(cfg.output))
    result = {"config": str(a.config), **bench_simulate(cfg, out)}
    stages = result["masking_stage_seconds"]
    return _json_or_table(a, result, {k: v for k, v in result.items() if k != "masking_stage_seconds"} | stages)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """bench and its benchmarks, in the order --help lists them."""
    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(dest="sub", required=True)
    _add_trace(bench)
    _add_secagg(bench)
    _add_rounds(bench)
    _add_deploy(bench)
    _add_align(bench)
    _add_trace_rounds(bench)
    _add_starts(bench)
    _add_blackbox(bench)
    _add_censored(bench)
    _add_simulate(bench)


def _add_trace(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bt = bench.add_parser("trace", help="seconds to score one suspect against N customers")
    bt.add_argument("--users", type=_positive, default=1_000_000, help="customers scored")
    bt.add_argument("--length", type=_positive, default=2048, help="code length L")
    bt.add_argument("--max-colluders", type=_positive, default=5, help="the coalition merged and traced")
    bt.add_argument("--repeats", type=_positive, default=5, help="scorings timed (the best is reported)")
    add_seed(bt)
    add_json(bt)
    bt.set_defaults(func=cmd_bench_trace)


def _add_secagg(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bs = bench.add_parser("secagg", help="one masked-aggregation round against a plain sum")
    bs.add_argument("--clients", type=_positive, default=10, help="clients in the round")
    bs.add_argument("--params", type=_positive, default=1_000_000, help="values in each update")
    bs.add_argument("--dropout", type=_finite, default=0.0, help="share of clients vanishing before masked input")
    bs.add_argument("--graph", choices=("complete", "sparse"), default="complete", help="SecAgg (complete) or SecAgg+")
    bs.add_argument("--threat", choices=("semi-honest", "malicious"), default="semi-honest",
                    help="malicious: keys and survivor lists signed (secagg.threat)")  # fmt: skip
    add_seed(bs)
    add_json(bs)
    bs.set_defaults(func=cmd_bench_secagg)


def _add_rounds(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    br = bench.add_parser("rounds", help="seconds per round: plain FedAvg, securemark, Flower's SecAgg+")
    br.add_argument("--clients", type=_positive, default=10, help="clients, all in every round")
    br.add_argument("--params", type=_positive, default=1_000_000, help="MLP sized to about this many parameters")
    br.add_argument("--rounds", type=_positive, default=3, help="the first is warm-up and not counted")
    br.add_argument("--repeats", type=_positive, default=2, help="runs of each variant, in alternating order")
    add_seed(br)
    add_json(br)
    br.set_defaults(func=cmd_bench_rounds)


def _add_deploy(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bd = bench.add_parser(
        "deploy", help="a SuperLink and SuperNodes on loopback: plain vs masked rounds, a node killed"
    )
    bd.add_argument("--app", type=Path, default=Path("."), help="the Flower app directory (this repository)")
    bd.add_argument("--nodes", type=_positive, default=4, help="SuperNodes started (at least 3)")
    bd.add_argument("--rounds", type=_positive, default=3, help="the first is warm-up and not counted")
    bd.add_argument("--grace", type=_finite, default=10.0, help="secagg.grace: seconds to wait past the threshold")
    bd.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                    help="process: a separate flower-superexec beside each SuperNode")  # fmt: skip
    add_json(bd)
    bd.set_defaults(func=cmd_bench_deploy)


def _add_align(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ba = bench.add_parser("align", help="seconds to align an obfuscated suspect: quickstart CNN, 10^7-parameter "
                          "MLP, ResNet-18, a ViT")  # fmt: skip
    ba.add_argument("--repeats", type=_positive, default=3, help="alignments timed per model")
    ba.add_argument("--budget", type=_finite, default=0.05, help="the stand-in mark's RMS relative to the weights'")
    ba.add_argument("--small", action="store_true",
                    help="the quickstart CNN, ResNet-18 of width 8, a 2-block ViT (no 10^7-parameter MLP)")  # fmt: skip
    add_seed(ba)
    add_json(ba)
    ba.set_defaults(func=cmd_bench_align)


def _add_trace_rounds(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bt = bench.add_parser("trace-rounds", help="a run's registry against its rounds: bytes, trace seconds, copies of "
                          "early, middle and final rounds, customers mixing their own copies of rounds")  # fmt: skip
    bt.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="mlp: sized by --params; cnn: quickstart's")
    bt.add_argument("--params", type=_positive, default=1_000_000, help="the MLP's size in parameters")
    bt.add_argument("--rounds", type=_positive, default=100, help="FedAvg rounds on the offline MNIST-5k digits")
    bt.add_argument("--customers", type=_positive, default=100, help="clients, one customer each")
    bt.add_argument("--per-round", type=_positive, default=10, help="clients sampled each round")
    bt.add_argument("--anchor-every", type=_positive, default=16, help="fingerprint.anchor_every: a model file kept "
                    "every this many rounds")  # fmt: skip
    bt.add_argument("--length", type=_positive, default=1024, help="code length L (the quickstart's)")
    bt.add_argument("--max-colluders", type=_positive, default=4, help="c_max (the quickstart's)")
    bt.add_argument("--copies", type=_positive, default=20, help="customers traced per round and attack")
    bt.add_argument("--trials", type=_positive, default=100, help="customers mixing their own rounds, per kind")
    bt.add_argument("--timed", type=_positive, default=10, help="final copies timed against every base and one")
    add_seed(bt)
    add_json(bt)
    bt.set_defaults(func=cmd_bench_trace_rounds)


def _add_starts(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bs = bench.add_parser("starts", help="how far honest FedAvg moves a node's model between its rounds, against "
                          "its update: the margin of a node's replay check")  # fmt: skip
    bs.add_argument("--partitions", nargs="+", choices=("iid", "dirichlet", "pathological"),
                    default=["iid", "dirichlet", "pathological"], help="how the digits are split")  # fmt: skip
    bs.add_argument("--per-round", type=_positive, nargs="+", default=[10, 20],
                    help="clients, each sampled every round")  # fmt: skip
    bs.add_argument("--rounds", type=_positive, default=15, help="FedAvg rounds on the offline MNIST-5k digits")
    bs.add_argument("--lr", type=_finite, default=0.05, help="local learning rate")
    add_seed(bs)
    add_json(bs)
    bs.set_defaults(func=cmd_bench_starts)


def _add_blackbox(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bb = bench.add_parser("blackbox", help="function mark: fidelity, HTTP tracing, distilled students (MNIST-5k CNN)")
    bb.add_argument("--customers", type=_positive, default=1000, help="customers in the registry")
    bb.add_argument("--trials", type=_positive, default=2, help="trials per cell")
    bb.add_argument("--copies", type=_positive, default=10, help="copies measured for fidelity")
    bb.add_argument("--colluders", type=_positive, nargs="+", default=[1, 2, 4], help="coalition sizes of the students")
    bb.add_argument("--temperatures", type=_finite, nargs="+", default=[1.0, 4.0], help="distillation temperatures")
    bb.add_argument("--archs", nargs="+", choices=("cnn", "mlp"), default=["cnn", "mlp"], help="student models")
    bb.add_argument("--no-hard", action="store_true", help="skip the hard-label students")
    bb.add_argument("--no-students", action="store_true", help="no distilled students: fidelity, intact copies")
    bb.add_argument("--budget", type=_finite, default=0.03, help="function mark RMS / centred logits RMS")
    bb.add_argument("--epochs", type=_positive, default=20, help="the pirate's distillation epochs")
    bb.add_argument("--queries", type=_positive, default=10_000, help="the tracer's queries per student")
    bb.add_argument("--base", type=Path, default=None, help="a torch.save'd state dict of the quickstart CNN")
    bb.add_argument("--triggers", type=_natural, default=10, help="trigger-set baseline: keys per customer (0: skip)")
    bb.add_argument("--tail", type=_natural, default=0,
                    help="innocent tail: this many independently trained models, intact copies and students of "
                    "single copies, each traced against every customer")  # fmt: skip
    bb.add_argument("--noise", type=_nonnegative, nargs="+", default=[], metavar="STD",
                    help="also serve intact copies with Gaussian noise of these standard deviations on every logit: "
                    "catch against the served accuracy")  # fmt: skip
    add_seed(bb)
    add_json(bb)
    bb.set_defaults(func=cmd_bench_blackbox)


def _add_censored(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = "black-box catch rate when a server censors its answers, over many trained models"
    bc = bench.add_parser("censored", help=about)
    bc.add_argument("--seeds", type=_positive, default=20, help="trained models per architecture (default 20)")
    bc.add_argument(
        "--archs",
        nargs="+",
        choices=("cnn", "mlp", "quickstart"),
        default=["cnn", "mlp"],
        help="cnn, mlp: 8x8 synthetic data, as in the tests; quickstart: the MNIST-5k CNN (default cnn mlp)",
    )
    bc.add_argument("--served", nargs="+", choices=CENSORED, default=list(CENSORED), metavar="KIND",
                    help=f"censorings to serve (default all: {', '.join(CENSORED)})")  # fmt: skip
    bc.add_argument("--queries", type=_positive, default=800, help="the tracer's queries per suspect (default 800)")
    add_json(bc)
    bc.set_defaults(func=cmd_bench_censored)


def _add_simulate(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = "one federation measured: s/round, peak memory (all processes), tracing"
    bsim = _config_command(bench, "simulate", about, "train.rounds=3", unique=True)
    add_json(bsim)
    bsim.set_defaults(func=cmd_bench_simulate)
