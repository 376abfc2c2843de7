"""securemark codes eval: a code's catch rate and false accusations under an attack, by Monte Carlo."""

from __future__ import annotations

import argparse
import sys

from securemark.cli.args import _finite, _positive, add_json, add_seed
from securemark.cli.output import _json_or_table
from securemark.codes.base import CODE_KINDS
from securemark.codes.channel import ATTACKS


def cmd_codes_eval(a: argparse.Namespace) -> object:
    from securemark.evaluation.codes import CodeTrialSpec, evaluate_code

    spec = CodeTrialSpec(
        a.code, a.users, a.colluders, a.length, a.attack, a.noise, a.trials, a.eps, a.seed, a.max_colluders, a.detector
    )
    result = evaluate_code(spec, progress=sys.stderr.isatty())
    return _json_or_table(a, result)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    codes = sub.add_parser("codes", help="collusion-resistant codes").add_subparsers(dest="sub", required=True)
    ev = codes.add_parser("eval", help="Monte-Carlo catch rate and false accusations of a code under an attack")
    ev.add_argument(
        "--code",
        choices=CODE_KINDS,
        default="tardos",
        help="the code: Tardos (arcsine bias), random +-1 rows or BIBD (PG(2,q))",
    )
    ev.add_argument("--users", type=_positive, default=1000, help="customers holding a code row")
    ev.add_argument("--colluders", type=_positive, default=5, help="customers in the coalition that merges its rows")
    ev.add_argument("--length", type=_positive, default=2048, help="code length L (bits a row holds)")
    ev.add_argument("--attack", choices=ATTACKS, default="average", help="how the coalition merges its rows")
    ev.add_argument(
        "--noise",
        type=_finite,
        default=0.0,
        help="standard deviation of Gaussian noise added to the merged observation",
    )
    ev.add_argument("--trials", type=_positive, default=200, help="coalitions drawn")
    ev.add_argument("--eps", type=_finite, default=1e-3, help="bound on P(any innocent accused)")
    add_seed(ev)
    ev.add_argument("--max-colluders", type=_positive, default=None, help="design size (default: --colluders)")
    ev.add_argument("--detector", choices=("and", "soft"), default="and", help="BIBD detector")
    add_json(ev)
    ev.set_defaults(func=cmd_codes_eval)
