"""The owner's commands: registry init and show, trace (the customers behind a suspect model) and attack
(collusion, pruning, quantization, noise on model files); issue (copies to customers) is cli.issue."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from securemark.cli.args import _finite, _natural, _positive, add_arch, add_json, add_seed, arch_of, arch_record
from securemark.cli.issue import add_issue
from securemark.cli.output import _print_json
from securemark.cli.suspects import NOT_ALIGNED, read_against, suspect_files, trace_many
from securemark.codes.base import CODE_KINDS
from securemark.errors import InputError

if TYPE_CHECKING:
    from securemark.registry import Base
    from securemark.tracing.tracer import TraceReport

# the CLI parses without importing torch: a test checks this equals securemark.attacks.COLLUSION_METHODS
COLLUSION_METHODS = (
    "average", "median", "interleave", "layer-interleave", "extreme", "erase", "extrapolate", "convex",
)  # fmt: skip


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
    record = arch_record(a)
    if params.code == "bibd":
        print(
            "warning: BIBD (DeepMarks) detectors have no false-accusation bound: a laundered model that carries no"
            " mark can implicate innocent customers. Tardos codes bound it by eps.",
            file=sys.stderr,
        )
    with Registry.init(a.directory, params) as reg:
        if record is not None:
            reg.set_arch(record)
        print(
            f"registry created at {reg.directory} ({params.code}, L={params.length}, c_max={params.max_colluders},"
            f" eps={params.eps}); the owner secret is in {reg.directory / 'owner.key'} (mode 0600): back it up"
        )
        if record is not None:
            print(f"architecture {record['target']}: {len(record['groups'])} unit groups from its graph")


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
                "bases": [_base_row(b, base, reg.model_path(b.digest).is_file()) for b in reg.bases()],
                "size": reg.size(),
                "deliveries": reg.deliveries(),
                "contested": reg.contested(),
            }
        )


def _base_row(base: Base, current: Base | None, file: bool) -> dict[str, object]:
    label = "current" if current is not None and base.digest == current.digest else base.label
    kept = file if base.kept is None else base.kept  # a registry from before anchors: its files say
    return {"label": label, "digest": base.digest, "model_kept": kept, "model_file": file}


def cmd_trace(a: argparse.Namespace) -> object:
    from securemark.fingerprint.align import load_groups
    from securemark.modelio import load_state_dict
    from securemark.registry import Registry
    from securemark.tracing.tracer import trace

    given = [x for x in (a.suspect or None, a.endpoint, a.query_model) if x is not None]
    if len(given) != 1:
        raise InputError("trace needs exactly one suspect source: weights FILEs or a folder, --endpoint, --query-model")
    if not a.suspect and (a.hard or a.align_spec or a.no_align or a.arch):
        raise InputError("--hard, --align-spec, --arch and --no-align apply to a weights file, not a black-box suspect")
    if sum(map(bool, (a.align_spec, a.arch, a.no_align))) > 1:
        raise InputError("--align-spec, --arch and --no-align exclude each other")
    if a.suspect and (len(a.suspect) > 1 or a.suspect[0].is_dir()):
        return trace_many(a, suspect_files(a.suspect))
    if a.suspect:
        arch = arch_of(a)
        suspect = load_state_dict(a.suspect[0])
        groups = load_groups(a.align_spec) if a.align_spec else None
        with Registry.open(a.directory) as reg:
            report = trace(suspect, reg, top_k=a.top, hard=a.hard, groups=groups, aligned=not a.no_align, arch=arch)
    else:
        report = _trace_black_box(a)
    unaligned = not report.aligned and not a.no_align  # --no-align asked for it: no warning, exit 0
    if unaligned:
        a.exit_status = NOT_ALIGNED
    if a.json:
        return report.to_json()
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    title = f"{a.suspect[0] if a.suspect else a.endpoint or a.query_model}: {report.users} customers, "
    title += f"threshold {report.threshold:.2f}, "
    title += f"eps {report.eps}"
    caption = f"alignment {report.alignment['status']}; bound: {report.bound}"
    if "queries" in report.alignment:
        al = report.alignment
        caption = f"black box: {al['queries']} queries, {al['outputs']} read; bound: {report.bound}"
    if "base" in report.alignment:  # a registry with several bases (a federation keeps each round's model)
        caption += f"; {read_against(report.alignment)}"
    table = Table(title=escape(title), caption=escape(caption))
    for col in ("customer", "score", "p-value", "accused"):
        table.add_column(col)
    accused = {s.customer for s in report.accused}
    for s in report.scores_top:
        pv = "" if s.p_value is None else f"{s.p_value:.2e}"
        mark = "ACCUSED" if s.customer in accused else "CONTESTED" if s.customer in report.contested else ""
        table.add_row(escape(s.customer), f"{s.score:.3f}", pv, mark)  # a name is data, never markup
    if unaligned:
        print(f"not aligned: {str(report.alignment['status']).removeprefix('off: ')}")
        print("  a copy whose units were permuted or rescaled would escape this reading; register the model's "
              "architecture (registry init --arch, or trace --arch) to read one")  # fmt: skip
    Console().print(table)
    print("accused: " + (", ".join(s.customer for s in report.accused) or "nobody")
          + (" (not aligned)" if unaligned else ""))  # fmt: skip
    for name, why in report.contested.items():
        print(f"contested, not accused: {name} scores above the threshold, but {why}")
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


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def cmd_attack(a: argparse.Namespace) -> None:
    from securemark import attacks
    from securemark.modelio import load_state_dict, save_state_dict

    rng = np.random.default_rng(a.seed)
    if a.attack == "collude":
        out, record = attacks.collude([load_state_dict(f) for f in a.files], a.method, rng, a.alpha)
    elif a.attack == "mix-rounds":
        out, record = attacks.mix_rounds([load_state_dict(f) for f in a.files], rng, a.weights)
    elif a.attack == "prune":
        out, record = attacks.prune(load_state_dict(a.file), a.ratio, a.scope)
    elif a.attack == "quantize":
        out, record = attacks.quantize(load_state_dict(a.file), a.bits)
    else:
        out, record = attacks.add_noise(load_state_dict(a.file), a.std, rng)
    save_state_dict(out, a.out)
    print(json.dumps({**record, "out": str(a.out)}))


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """registry, issue, trace and attack, in the order --help lists them."""
    _add_registry(sub)
    add_issue(sub)
    _add_trace(sub)
    _add_attack(sub)


def _add_registry(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reg = sub.add_parser("registry", help="the owner's registry").add_subparsers(dest="sub", required=True)
    ini = reg.add_parser("init", help="create a registry and a fresh owner secret")
    ini.add_argument("directory", type=Path, help="the registry folder")
    ini.add_argument("--code", choices=CODE_KINDS, default="tardos", help="the code customers' rows are drawn from")
    ini.add_argument("--length", type=_positive, default=2048, help="code length L (bits each copy carries)")
    ini.add_argument(
        "--max-colluders", type=_positive, default=5, help="the largest coalition the code is designed for"
    )
    ini.add_argument("--eps", type=_finite, default=1e-3, help="bound on P(any innocent accused) the tracer certifies")
    ini.add_argument("--budget", type=_finite, default=0.05, help="perturbation RMS / carrier RMS")
    ini.add_argument(
        "--carrier",
        choices=("weights", "filter-mean"),
        default="weights",
        help="the mark in every weight, or in each selected tensor's mean over its filters (Uchida)",
    )
    ini.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                     help="tensors the white-box mark leaves alone (fnmatch, repeatable), e.g. 'head.3.*' for a "
                     "function mark")  # fmt: skip
    add_arch(ini, "unit groups derived from its graph are recorded, so suspects of any architecture are aligned")
    ini.set_defaults(func=cmd_registry_init)
    show = reg.add_parser("show", help="print a registry's parameters, customers and deliveries as JSON")
    show.add_argument("directory", type=Path, help="the registry folder")
    show.set_defaults(func=cmd_registry_show)


def _add_trace(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tr = sub.add_parser("trace", help="name the customers behind a suspect model (weights, or outputs only)")
    tr.add_argument("directory", type=Path, help="the registry folder")
    tr.add_argument("suspect", type=Path, nargs="*", default=[],
                    help="the suspect's weights (white-box); several, or a folder: a line each")  # fmt: skip
    tr.add_argument("--endpoint", default=None, help="black box: http://host:port/v2/models/NAME (Open Inference V2)")
    tr.add_argument("--query-model", type=Path, default=None, help="black box: a TorchScript file, outputs only")
    tr.add_argument("--query-data", type=Path, default=None, help="query inputs (.npz, array x: N,C,H,W)")
    tr.add_argument("--queries", type=_positive, default=2000, help="black-box query budget")
    tr.add_argument(
        "--outputs",
        choices=("auto", "probs", "logits"),
        default="auto",
        help="what the suspect answers with (auto: read every way, keep the closest to the base)",
    )
    tr.add_argument("--timeout", type=_finite, default=30.0,
                    help="seconds one HTTP request, or one batch of a --query-model, may take (> 0)")  # fmt: skip
    tr.add_argument("--retries", type=_natural, default=3, help="retries of a failed request, counted in --queries")
    tr.add_argument("--top", type=_positive, default=10, help="customers shown, highest score first")
    tr.add_argument("--hard", action="store_true", help="score the signs of the extracted code only")
    tr.add_argument("--align-spec", type=Path, default=None,
                    help="unit groups (JSON, experts: docs/explanations/alignment.md), not derived ones")  # fmt: skip
    add_arch(tr, "for a registry made without one (its unit groups derived now)")
    tr.add_argument("--no-align", action="store_true", help="read the suspect in its own coordinates")
    add_json(tr)
    tr.set_defaults(func=cmd_trace)


def _add_attack(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    att = sub.add_parser("attack", help="attacks on model files").add_subparsers(dest="attack", required=True)
    col = att.add_parser("collude", help="merge copies")
    col.add_argument("files", type=Path, nargs="+", help="the colluders' copies")
    col.add_argument("--method", choices=COLLUSION_METHODS, default="average", help="how the copies are merged")
    col.add_argument("--alpha", type=_finite, default=0.5, help="extrapolate: w_a + alpha (w_a - w_b)")
    mix = att.add_parser("mix-rounds", help="one customer's own copies of several rounds, weighted and summed")
    mix.add_argument("files", type=Path, nargs="+", help="the customer's copies, one per round")
    mix.add_argument("--weights", type=_weights, default=None, help="comma-separated, summing to 1 (default: equal)")
    pr = att.add_parser("prune", help="magnitude pruning")
    pr.add_argument("file", type=Path, help="the model to prune")
    pr.add_argument("--ratio", type=_finite, required=True, help="share of weights set to zero")
    pr.add_argument(
        "--scope",
        choices=("global", "layer"),
        default="global",
        help="the smallest weights of the whole model, or of each layer",
    )
    qu = att.add_parser("quantize", help="integer (4, 8) or float16 (16) round trip")
    qu.add_argument("file", type=Path, help="the model to quantize")
    qu.add_argument("--bits", type=int, choices=(4, 8, 16), default=8, help="bits per weight")
    no = att.add_parser("noise", help="add Gaussian noise of absolute std S to every weight")
    no.add_argument("file", type=Path, help="the model to add noise to")
    no.add_argument(
        "--std", type=_finite, required=True, help="standard deviation of the Gaussian noise added to every weight"
    )
    for sp in (col, mix, pr, qu, no):
        sp.add_argument("--out", type=Path, required=True, help="where the attacked model is written")
        add_seed(sp)
        sp.set_defaults(func=cmd_attack)
