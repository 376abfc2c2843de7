"""securemark command line: codes | registry | issue | trace | attack | bench | simulate | evaluate | demo.

Over 400 lines, and doing several jobs (parser, commands, output, signals): the split into a cli/ package with
one module per command group is its own piece of work (the docs-and-structure issue), pinned first by golden
tests of every flag, default, exit code and --json output, not done beside other changes."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from securemark.codes.base import CODE_KINDS
from securemark.codes.channel import ATTACKS

# the CLI parses without importing torch: a test checks this equals securemark.attacks.COLLUSION_METHODS
COLLUSION_METHODS = ("average", "median", "interleave", "layer-interleave", "extreme", "extrapolate", "convex")
# ... and CENSORED equals securemark.evaluation.censored.CENSORS
CENSORED = ("rounded", "rounded-2", "float16", "clamp", "top3", "top3-renormalized", "top-k varying")
RAY_HELP = "run trials as Ray tasks: local (this machine's cores, the default), auto or ray://host:port (a cluster)"
# bad input or an unusable environment: one line and exit 2 (OSError covers missing, existing or unwritable
# paths, a closed pipe and an unreachable cluster; OverflowError a number too large for a float)
if TYPE_CHECKING:
    from securemark.tracing.tracer import TraceReport

EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError, OSError, OverflowError)


def _strict(obj: object) -> object:
    """NaN and infinities -> None, numpy scalars -> floats: what --json prints is always strict JSON."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _print_json(obj: object) -> None:
    print(json.dumps(_strict(obj), indent=2, allow_nan=False, default=float))


def _json_or_table(a: argparse.Namespace, result: dict[str, object], *tables: dict[str, object]) -> object:
    """``result`` for main to print as JSON under --json, else shown here as ``tables`` (default: ``result``
    as one table)."""
    if a.json:
        return result
    for rows in tables or (result,):
        _table(rows)
    return None


@contextmanager
def _stdout_reserved(reserve: bool) -> Iterator[None]:
    """With ``reserve``, stdout is kept for the JSON main prints afterwards: while the command runs, whatever
    else would reach stdout goes to stderr instead. Python prints and rich consoles see sys.stdout swapped;
    when stdout is a real file descriptor, it is also pointed at stderr's, so Flower's and Ray's output (their
    handlers hold the old stream, some write from threads or native code) follows."""
    if not reserve:
        yield
        return
    real = sys.stdout
    if real is None:
        raise OSError("stdout is closed: --json has nowhere to write")
    real.flush()
    try:
        fd = real.fileno()
    except (OSError, ValueError, AttributeError):  # a test's capture object: no descriptor to move
        fd = -1
    saved = os.dup(fd) if fd >= 0 else -1
    if fd >= 0:
        os.dup2(sys.stderr.fileno(), fd)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        # whatever was written meanwhile through a cached stdout object or C stdio goes out while fd 1 still
        # points at stderr
        real.flush()
        sys.stderr.flush()
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)
        sys.stdout = real
        if fd >= 0:
            os.dup2(saved, fd)
            os.close(saved)


def _table(rows: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False)
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


# --- codes -----------------------------------------------------------------------------------------
def cmd_codes_eval(a: argparse.Namespace) -> object:
    from securemark.codes.evaluate import CodeTrialSpec, evaluate_code

    spec = CodeTrialSpec(
        a.code, a.users, a.colluders, a.length, a.attack, a.noise, a.trials, a.eps, a.seed, a.max_colluders, a.detector
    )
    result = evaluate_code(spec, progress=sys.stderr.isatty())
    return _json_or_table(a, result)


# --- registry, issue, trace ------------------------------------------------------------------------
def cmd_registry_init(a: argparse.Namespace) -> None:
    from securemark.registry import Registry, RegistryParams

    params = RegistryParams(
        code=a.code,
        length=a.length,
        max_colluders=a.max_colluders,
        eps=a.eps,
        budget=a.budget,
        carrier_mode=a.carrier,
        exclude=tuple(a.exclude),
    )
    if params.code == "bibd":
        print(
            "warning: BIBD (DeepMarks) detectors have no false-accusation bound: a laundered model that carries no"
            " mark can implicate innocent customers. Tardos codes bound it by eps.",
            file=sys.stderr,
        )
    with Registry.init(a.directory, params) as reg:
        print(
            f"registry created at {reg.directory} ({params.code}, L={params.length}, c_max={params.max_colluders},"
            f" eps={params.eps}); the owner secret is in {reg.directory / 'owner.key'} (mode 0600): back it up"
        )


def cmd_registry_show(a: argparse.Namespace) -> None:
    from dataclasses import asdict

    from securemark.registry import Registry

    with Registry.open(a.directory) as reg:
        base = reg.base()
        _print_json(
            {
                "params": asdict(reg.params),
                "customers": reg.customers(),
                "base": None
                if base is None
                else {
                    "digest": base.digest,
                    "strength": base.strength,
                    "carrier_tensors": [n for n, _ in base.tensors],
                },
                "deliveries": reg.deliveries(),
            }
        )


def cmd_issue(a: argparse.Namespace) -> None:
    """The delivery is recorded only once the copy's file is whole on disk (written beside it, then renamed);
    an --out the CLI cannot write is refused before any customer or delivery is recorded."""
    from securemark import modelio
    from securemark.owner import make_copy
    from securemark.registry import Registry

    out: Path = a.out
    if out.suffix not in modelio.MODEL_SUFFIXES:
        raise modelio.ModelFileError(f"{out}: unknown model format; use one of {', '.join(modelio.MODEL_SUFFIXES)}")
    if out.resolve() == Path(a.model).resolve() or Path(a.directory).resolve() in out.resolve().parents:
        raise ValueError(f"{out}: a copy is never written over the base model or inside the registry")
    _check_writable(out)
    base = modelio.load_state_dict(a.model)
    function = None
    if a.config is not None:  # the function mark as a run of this config makes it (its held-out share)
        from securemark import data
        from securemark.config import SimConfig
        from securemark.owner import function_spec

        cfg = SimConfig.load(a.config)
        function = function_spec(cfg, data.server_split(cfg.data, cfg.train.seed)[1])
        if function is None:
            raise ValueError(f"{a.config} puts no function mark in copies (fingerprint off, or function_budget 0)")
    with Registry.open(a.directory) as reg, reg.issuing():
        copy, customer = make_copy(reg, base, a.customer, function=function)
        modelio.save_atomic(copy, out)
        reg.record_delivery(customer, modelio.state_digest(copy), note=str(out))
    print(f"issued {out} to {a.customer!r} (sha256 {modelio.file_sha256(out)[:16]}...)")


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written (a directory, a read-only folder) by writing a scratch file
    where it would go: permission bits say nothing to root, and /proc takes no files."""
    import tempfile

    if out.is_dir():
        raise OSError(f"{out} is a directory")
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())  # missing folders are made later
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{out.stem}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise OSError(f"{out}: cannot write there ({exc.strerror or exc})") from None


def cmd_trace(a: argparse.Namespace) -> object:
    from securemark.fingerprint.align import load_groups
    from securemark.modelio import load_state_dict
    from securemark.registry import Registry
    from securemark.tracing.tracer import trace

    given = [x for x in (a.suspect, a.endpoint, a.query_model) if x is not None]
    if len(given) != 1:
        raise ValueError("trace needs exactly one suspect: a weights FILE, --endpoint URL or --query-model FILE")
    if a.suspect is None and (a.hard or a.align_spec or a.no_align):
        raise ValueError("--hard, --align-spec and --no-align apply to a weights file, not to a black-box suspect")
    if a.suspect is not None:
        suspect = load_state_dict(a.suspect)
        groups = load_groups(a.align_spec) if a.align_spec else None
        with Registry.open(a.directory) as reg:
            report = trace(suspect, reg, top_k=a.top, hard=a.hard, groups=groups, aligned=not a.no_align)
    else:
        report = _trace_black_box(a)
    if a.json:
        return report.to_json()
    from rich.console import Console
    from rich.table import Table

    title = f"{a.suspect or a.endpoint or a.query_model}: {report.users} customers, threshold {report.threshold:.2f}, "
    title += f"eps {report.eps}"
    caption = f"alignment {report.alignment['status']}; bound: {report.bound}"
    if "queries" in report.alignment:
        al = report.alignment
        caption = f"black box: {al['queries']} queries, {al['outputs']} read; bound: {report.bound}"
    if "base" in report.alignment:  # a registry with several bases (a federation keeps each round's model)
        caption += f"; read against the {report.alignment['base']} ({report.alignment['bases_tried']} bases kept)"
    table = Table(title=title, caption=caption)
    for col in ("customer", "score", "p-value", "accused"):
        table.add_column(col)
    accused = {s.customer for s in report.accused}
    for s in report.scores_top:
        pv = "" if s.p_value is None else f"{s.p_value:.2e}"
        table.add_row(s.customer, f"{s.score:.3f}", pv, "ACCUSED" if s.customer in accused else "")
    Console().print(table)
    print("accused: " + (", ".join(s.customer for s in report.accused) or "nobody"))
    return None


def _trace_black_box(a: argparse.Namespace) -> TraceReport:
    from securemark.registry import Registry
    from securemark.tracing.blackbox import BlackBoxTracer, load_query_data
    from securemark.tracing.oracle import HttpV2Oracle, TorchScriptOracle

    data = load_query_data(a.query_data) if a.query_data else None
    with Registry.open(a.directory) as reg:
        tracer = BlackBoxTracer(reg, data)  # the registry checked before the suspect is touched
        if a.endpoint is not None:
            oracle = HttpV2Oracle(a.endpoint, a.queries, timeout=a.timeout, retries=a.retries)
            return tracer.trace(oracle, a.queries, a.outputs, a.top)
        with TorchScriptOracle(a.query_model, a.queries, timeout=a.timeout) as script:  # in a child process
            return tracer.trace(script, a.queries, a.outputs, a.top)


# --- attacks ---------------------------------------------------------------------------------------
def cmd_attack(a: argparse.Namespace) -> None:
    from securemark import attacks
    from securemark.modelio import load_state_dict, save_state_dict

    rng = np.random.default_rng(a.seed)
    if a.attack == "collude":
        out, record = attacks.collude([load_state_dict(f) for f in a.files], a.method, rng, a.alpha)
    elif a.attack == "prune":
        out, record = attacks.prune(load_state_dict(a.file), a.ratio, a.scope)
    elif a.attack == "quantize":
        out, record = attacks.quantize(load_state_dict(a.file), a.bits)
    else:
        out, record = attacks.add_noise(load_state_dict(a.file), a.std, rng)
    save_state_dict(out, a.out)
    print(json.dumps({**record, "out": str(a.out)}))


# --- bench -----------------------------------------------------------------------------------------
def cmd_bench_trace(a: argparse.Namespace) -> object:
    from securemark.codes import pack_bits, tardos
    from securemark.tracing.bound import Law
    from securemark.tracing.scores import PackedCodebook, accuse, tardos_scores

    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    bias = tardos.arcsine_bias(rng.random(a.length), a.max_colluders)
    packed = np.empty((a.users, (a.length + 7) // 8), dtype=np.uint8)
    for s in range(0, a.users, 50_000):  # genuine Tardos rows, generated in blocks
        u = rng.random((min(50_000, a.users - s), a.length), dtype=np.float32)
        packed[s : s + len(u)] = pack_bits(tardos.draw_rows(bias.astype(np.float32), u))
    t1 = time.perf_counter()
    book = PackedCodebook.from_packed_rows(packed, a.length)
    t2 = time.perf_counter()
    coalition = rng.choice(a.users, size=a.max_colluders, replace=False)
    rows = np.unpackbits(packed[coalition], axis=1, count=a.length).astype(np.float64)
    y = (2 * rows - 1).mean(0)
    times = []
    for _ in range(a.repeats):
        s0 = time.perf_counter()
        acc = accuse(tardos_scores(book, y, bias), Law.of(y, bias), 1e-3)
        times.append(time.perf_counter() - s0)
    result = {
        "users": a.users,
        "length": a.length,
        "generate_seconds": round(t1 - t0, 3),
        "layout_seconds": round(t2 - t1, 3),
        "score_seconds_median": round(float(np.median(times)), 4),
        "score_seconds_min": round(min(times), 4),
        "repeats": a.repeats,
        "accused_colluders": int(np.isin(acc.accused, coalition).sum()),
        "accused_innocents": int((~np.isin(acc.accused, coalition)).sum()),
        "codebook_mib": round(book.columns.nbytes / 2**20, 1),
    }
    return _json_or_table(a, result)


def cmd_bench_secagg(a: argparse.Namespace) -> object:
    from securemark.secagg.bench import bench_secagg

    result = bench_secagg(a.clients, a.params, a.dropout, a.graph, a.seed)
    shown = {
        k: v for k, v in result.items() if k not in ("stage_seconds", "prg_bytes_per_second", "mask_bytes_per_second")
    }
    shown["prg_MB_per_second"] = result["prg_bytes_per_second"] / 1e6
    shown["mask_MB_per_second"] = result["mask_bytes_per_second"] / 1e6
    return _json_or_table(a, result, shown | result["stage_seconds"])


def cmd_bench_rounds(a: argparse.Namespace) -> object:
    from securemark.flower.bench_rounds import bench_rounds

    result = bench_rounds(a.clients, a.params, a.rounds, a.seed)
    shown = {k: v for k, v in result.items() if k not in ("per_round_seconds", "stage_seconds")}
    stages = {f"{v}_{s}_seconds": t for v, by in result["stage_seconds"].items() for s, t in by.items()}
    return _json_or_table(a, result, shown | stages)


def cmd_bench_deploy(a: argparse.Namespace) -> object:
    from securemark.flower.bench_deploy import bench_deploy

    result = bench_deploy(a.app, a.nodes, a.rounds, a.grace, a.isolation)
    runs = [{"run": k, **{f: str(v[f]) for f in ("per_round_seconds", "survived")}} for k, v in result["runs"].items()]
    return _json_or_table(a, result, {k: v for k, v in result.items() if k != "runs"}, *runs)


def cmd_bench_align(a: argparse.Namespace) -> object:
    from securemark.fingerprint.bench_align import bench_align

    result = bench_align(a.repeats, a.budget, a.seed, large=not a.small)
    models: list[dict[str, object]] = result["models"]  # type: ignore[assignment]
    return _json_or_table(a, result, *models)


def cmd_bench_blackbox(a: argparse.Namespace) -> object:
    from securemark.evaluation.blackbox import main as bench_blackbox
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
    from securemark.evaluation.censored import bench_censored

    result = bench_censored(tuple(a.archs), a.seeds, tuple(a.served), a.queries)
    cells: list[dict[str, object]] = result["cells"]
    return _json_or_table(a, result, {k: v for k, v in result.items() if k != "cells"}, *cells)


def cmd_bench_simulate(a: argparse.Namespace) -> object:
    from securemark.config import SimConfig
    from securemark.flower.bench_simulate import bench_simulate

    cfg = SimConfig.load(a.config, a.set)
    out = Path(a.out) if a.out else _fresh_dir(Path(cfg.output))
    result = {"config": str(a.config), **bench_simulate(cfg, out)}
    stages = result["masking_stage_seconds"]
    return _json_or_table(a, result, {k: v for k, v in result.items() if k != "masking_stage_seconds"} | stages)


def cmd_simulate(a: argparse.Namespace) -> None:
    from securemark.config import SimConfig
    from securemark.sim import simulate

    if (a.config is None) == (a.resume is None):
        raise SystemExit("securemark simulate: give CONFIG, or --resume DIR (a run that stopped early), not both")
    if a.resume is not None:  # the run's own config, as it wrote it
        out = Path(a.resume)
        if not (out / "config.toml").is_file():
            raise SystemExit(f"securemark simulate: {out} holds no run to resume (no config.toml)")
        cfg = SimConfig.load(out / "config.toml", a.set)
    else:
        cfg = SimConfig.load(a.config, a.set)
        out = Path(a.out or cfg.output)
    metrics = simulate(cfg, out, resume=a.resume is not None)
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

    cfg = EvalConfig.load(a.config, a.set)
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
    beside = Path(__file__).resolve().parents[1] / path
    return beside if beside.exists() else path


def _fresh_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``... : the first that holds no run yet."""
    candidate, n = base, 1
    while (candidate / "metrics.json").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _natural(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def _nonnegative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# --- parser ----------------------------------------------------------------------------------------
def _config_command(parent: Any, name: str, help: str, example: str, unique: bool = False) -> argparse.ArgumentParser:
    """A command run from a config file: CONFIG, --out, --set."""
    cmd = parent.add_parser(name, help=help)
    cmd.add_argument("config", type=Path, nargs="?" if name == "simulate" else None)
    made_unique = ", made unique" if unique else ""
    cmd.add_argument("--out", default=None, help=f"output directory (default: the config's output{made_unique})")
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override, e.g. {example}")
    return cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="securemark", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    codes = sub.add_parser("codes", help="collusion-resistant codes").add_subparsers(dest="sub", required=True)
    ev = codes.add_parser("eval", help="Monte-Carlo catch rate and false accusations of a code under an attack")
    ev.add_argument("--code", choices=CODE_KINDS, default="tardos")
    ev.add_argument("--users", type=_positive, default=1000)
    ev.add_argument("--colluders", type=_positive, default=5)
    ev.add_argument("--length", type=_positive, default=2048)
    ev.add_argument("--attack", choices=ATTACKS, default="average")
    ev.add_argument("--noise", type=_finite, default=0.0)
    ev.add_argument("--trials", type=_positive, default=200)
    ev.add_argument("--eps", type=_finite, default=1e-3)
    ev.add_argument("--seed", type=_natural, default=0)
    ev.add_argument("--max-colluders", type=_positive, default=None, help="design size (default: --colluders)")
    ev.add_argument("--detector", choices=("and", "soft"), default="and", help="BIBD detector")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_codes_eval)

    reg = sub.add_parser("registry", help="the owner's registry").add_subparsers(dest="sub", required=True)
    ini = reg.add_parser("init", help="create a registry and a fresh owner secret")
    ini.add_argument("directory", type=Path)
    ini.add_argument("--code", choices=CODE_KINDS, default="tardos")
    ini.add_argument("--length", type=_positive, default=2048)
    ini.add_argument("--max-colluders", type=_positive, default=5)
    ini.add_argument("--eps", type=_finite, default=1e-3)
    ini.add_argument("--budget", type=_finite, default=0.05, help="perturbation RMS / carrier RMS")
    ini.add_argument("--carrier", choices=("weights", "filter-mean"), default="weights")
    ini.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                     help="tensors the white-box mark leaves alone (fnmatch, repeatable), e.g. 'head.3.*' for a "
                     "function mark")  # fmt: skip
    ini.set_defaults(func=cmd_registry_init)
    show = reg.add_parser("show", help="print a registry's parameters, customers and deliveries as JSON")
    show.add_argument("directory", type=Path)
    show.set_defaults(func=cmd_registry_show)

    iss = sub.add_parser("issue", help="issue a fingerprinted copy of a model to a customer")
    iss.add_argument("directory", type=Path)
    iss.add_argument("--model", type=Path, required=True)
    iss.add_argument("--customer", required=True)
    iss.add_argument("--out", type=Path, required=True)
    iss.add_argument("--config", type=Path, default=None,
                     help="a simulate config: the copy also carries the function (black-box) mark its runs make, "
                     "fitted on its held-out share (a base that has one recorded always carries it)")  # fmt: skip
    iss.set_defaults(func=cmd_issue)

    tr = sub.add_parser("trace", help="name the customers behind a suspect model (weights, or outputs only)")
    tr.add_argument("directory", type=Path)
    tr.add_argument("suspect", type=Path, nargs="?", default=None, help="the suspect's weights (white-box)")
    tr.add_argument("--endpoint", default=None, help="black box: http://host:port/v2/models/NAME (Open Inference V2)")
    tr.add_argument("--query-model", type=Path, default=None, help="black box: a TorchScript file, outputs only")
    tr.add_argument("--query-data", type=Path, default=None, help="query inputs (.npz, array x: N,C,H,W)")
    tr.add_argument("--queries", type=_positive, default=2000, help="black-box query budget")
    tr.add_argument("--outputs", choices=("auto", "probs", "logits"), default="auto")
    tr.add_argument("--timeout", type=_finite, default=30.0,
                    help="seconds one HTTP request, or one batch of a --query-model, may take (> 0)")  # fmt: skip
    tr.add_argument("--retries", type=_natural, default=3)
    tr.add_argument("--top", type=_positive, default=10)
    tr.add_argument("--hard", action="store_true", help="score the signs of the extracted code only")
    tr.add_argument("--align-spec", type=Path, default=None, help="unit groups (JSON) for models that are no chain")
    tr.add_argument("--no-align", action="store_true", help="read the suspect in its own coordinates")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_trace)

    att = sub.add_parser("attack", help="attacks on model files").add_subparsers(dest="attack", required=True)
    col = att.add_parser("collude", help="merge copies")
    col.add_argument("files", type=Path, nargs="+")
    col.add_argument("--method", choices=COLLUSION_METHODS, default="average")
    col.add_argument("--alpha", type=_finite, default=0.5, help="extrapolate: w_a + alpha (w_a - w_b)")
    pr = att.add_parser("prune", help="magnitude pruning")
    pr.add_argument("file", type=Path)
    pr.add_argument("--ratio", type=_finite, required=True)
    pr.add_argument("--scope", choices=("global", "layer"), default="global")
    qu = att.add_parser("quantize", help="integer (4, 8) or float16 (16) round trip")
    qu.add_argument("file", type=Path)
    qu.add_argument("--bits", type=int, choices=(4, 8, 16), default=8)
    no = att.add_parser("noise", help="add Gaussian noise of absolute std S to every weight")
    no.add_argument("file", type=Path)
    no.add_argument("--std", type=_finite, required=True)
    for sp in (col, pr, qu, no):
        sp.add_argument("--out", type=Path, required=True)
        sp.add_argument("--seed", type=_natural, default=0)
        sp.set_defaults(func=cmd_attack)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(dest="sub", required=True)
    bt = bench.add_parser("trace", help="seconds to score one suspect against N customers")
    bt.add_argument("--users", type=_positive, default=1_000_000)
    bt.add_argument("--length", type=_positive, default=2048)
    bt.add_argument("--max-colluders", type=_positive, default=5)
    bt.add_argument("--repeats", type=_positive, default=5)
    bt.add_argument("--seed", type=_natural, default=0)
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=cmd_bench_trace)

    bs = bench.add_parser("secagg", help="one masked-aggregation round against a plain sum")
    bs.add_argument("--clients", type=_positive, default=10)
    bs.add_argument("--params", type=_positive, default=1_000_000)
    bs.add_argument("--dropout", type=_finite, default=0.0, help="share of clients vanishing before masked input")
    bs.add_argument("--graph", choices=("complete", "sparse"), default="complete")
    bs.add_argument("--seed", type=_natural, default=0)
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=cmd_bench_secagg)

    br = bench.add_parser("rounds", help="seconds per round: plain FedAvg, securemark, Flower's SecAgg+")
    br.add_argument("--clients", type=_positive, default=10)
    br.add_argument("--params", type=_positive, default=1_000_000, help="MLP sized to about this many parameters")
    br.add_argument("--rounds", type=_positive, default=3, help="the first is warm-up and not counted")
    br.add_argument("--seed", type=_natural, default=0)
    br.add_argument("--json", action="store_true")
    br.set_defaults(func=cmd_bench_rounds)

    bd = bench.add_parser(
        "deploy", help="a SuperLink and SuperNodes on loopback: plain vs masked rounds, a node killed"
    )
    bd.add_argument("--app", type=Path, default=Path("."), help="the Flower app directory (this repository)")
    bd.add_argument("--nodes", type=_positive, default=4)
    bd.add_argument("--rounds", type=_positive, default=3, help="the first is warm-up and not counted")
    bd.add_argument("--grace", type=_finite, default=10.0, help="secagg.grace: seconds to wait past the threshold")
    bd.add_argument("--isolation", choices=("subprocess", "process"), default="subprocess",
                    help="process: a separate flower-superexec beside each SuperNode")  # fmt: skip
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(func=cmd_bench_deploy)

    ba = bench.add_parser("align", help="seconds to align an obfuscated suspect: quickstart CNN, 10^7-param MLP")
    ba.add_argument("--repeats", type=_positive, default=3)
    ba.add_argument("--budget", type=_finite, default=0.05, help="the stand-in mark's RMS relative to the weights'")
    ba.add_argument("--small", action="store_true", help="the quickstart CNN only")
    ba.add_argument("--seed", type=_natural, default=0)
    ba.add_argument("--json", action="store_true")
    ba.set_defaults(func=cmd_bench_align)

    bb = bench.add_parser("blackbox", help="function mark: fidelity, HTTP tracing, distilled students (MNIST-5k CNN)")
    bb.add_argument("--customers", type=_positive, default=1000)
    bb.add_argument("--trials", type=_positive, default=2, help="trials per cell")
    bb.add_argument("--copies", type=_positive, default=10, help="copies measured for fidelity")
    bb.add_argument("--colluders", type=_positive, nargs="+", default=[1, 2, 4])
    bb.add_argument("--temperatures", type=_finite, nargs="+", default=[1.0, 4.0])
    bb.add_argument("--archs", nargs="+", choices=("cnn", "mlp"), default=["cnn", "mlp"])
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
    bb.add_argument("--seed", type=_natural, default=0)
    bb.add_argument("--json", action="store_true")
    bb.set_defaults(func=cmd_bench_blackbox)

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
    bc.add_argument("--json", action="store_true")
    bc.set_defaults(func=cmd_bench_censored)

    about = "one federation measured: s/round, peak memory (all processes), tracing"
    bsim = _config_command(bench, "simulate", about, "train.rounds=3", unique=True)
    bsim.add_argument("--json", action="store_true")
    bsim.set_defaults(func=cmd_bench_simulate)

    sim = _config_command(sub, "simulate", "federated training on Flower's simulation engine (Ray)", "train.rounds=3")
    sim.add_argument("--resume", type=Path, default=None, metavar="DIR", help="go on with the run in DIR from its "
                     "last completed round (same registry, key and strength; its own config.toml)")  # fmt: skip
    sim.set_defaults(func=cmd_simulate)

    about = "traitor tracing under attack and collusion: trials, report, plots"
    ev = _config_command(sub, "evaluate", about, "evaluate.trials=50")
    ev.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help=RAY_HELP)
    ev.set_defaults(func=cmd_evaluate)

    demo = sub.add_parser("demo", help="quickstart: federated training, then a laundered leak traced to its customer")
    demo.add_argument("--config", type=Path, default=Path("configs/quickstart.toml"))
    demo.add_argument("--out", default=None, help="run directory (default: the config's output, made unique)")
    demo.add_argument("--seed", type=_natural, default=0, help="chooses the leaking customer")
    demo.add_argument("--owner", action="store_true", help="the owner workflow alone on digits: no federation")
    demo.set_defaults(func=cmd_demo)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds as after Ctrl-C: temporary registries and
    their owner keys removed, child processes and Ray stopped."""


def _terminate(signum: int, _frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        with _stdout_reserved(getattr(args, "json", False)):  # --json: stdout carries the JSON alone
            payload = args.func(args)
        if payload is not None:
            _print_json(payload)
            sys.stdout.flush()
    except EXPECTED_ERRORS as exc:  # bad input gets one clear line, not a traceback
        if isinstance(exc, UnicodeDecodeError):  # never quote the file's bytes (it may be a key)
            exc = ValueError("a file given as text is not UTF-8 text")
        print(f"securemark: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # what the command started (a Ray instance, actors) is already stopped
        terminated = isinstance(exc, _Terminated)
        print(f"securemark: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if in_main:  # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
