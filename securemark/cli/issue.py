"""`securemark issue`: fingerprinted copies of a base model for one customer or many, each recorded in the
registry once its file is whole on disk."""

from __future__ import annotations

import argparse
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

from securemark.cli.args import add_arch, add_json, arch_record
from securemark.errors import InputError

if TYPE_CHECKING:
    from rich.progress import Progress

    from securemark.owner import FunctionSpec
    from securemark.registry import Registry


def cmd_issue(a: argparse.Namespace) -> object:
    """Copies for one customer (--customer, --out FILE) or many (--customers / --customers-file, --out DIR: one
    NAME.safetensors each), made from one preparation. A delivery is recorded only once its copy's file is whole
    on disk (written beside it, then renamed), copy by copy; an --out that exists is refused unless --force, and
    one the CLI cannot write before any customer or delivery is recorded."""
    from securemark import modelio
    from securemark.owner import copies_for, relative_change
    from securemark.registry import Registry

    names = _customers(a)
    targets = _targets(a, names)
    base = modelio.load_state_dict(a.model)
    record = arch_record(a)
    function = _function_spec(a.config)
    issued, change = [], 0.0
    with Registry.open(a.directory) as reg, reg.issuing(), _progress(len(names)) as bar:
        if record is not None:
            reg.set_arch(record)
        _check_architecture(reg.arch(), base)
        _check_capacity(reg, names)
        task = bar.add_task("issuing copies", total=len(names))
        for (copy, customer), out in zip(copies_for(reg, base, names, function=function), targets, strict=True):
            modelio.save_atomic(copy, out)
            reg.record_delivery(customer, modelio.state_digest(copy), note=str(out))
            issued.append({"customer": customer.name, "file": str(out), "sha256": modelio.file_sha256(out)})
            change = max(change, relative_change(copy, base))
            bar.advance(task)
        current, params = reg.base(), reg.params
    strength = None if current is None else current.strength
    code = {"code": params.code, "length": params.length, "max_colluders": params.max_colluders, "eps": params.eps}
    summary = {"issued": issued, **code, "budget": params.budget, "strength": strength, "max_relative_change": change}
    if a.json:
        return summary
    where = issued[0]["file"] if len(issued) == 1 else f"{len(issued)} copies in {a.out}"
    print(f"issued {where} to {_names(names)} (sha256 {issued[0]['sha256'][:16]}...)" if len(issued) == 1
          else f"issued {where} ({_names(names)})")  # fmt: skip
    print(f"  code {params.code} L={params.length} c_max={params.max_colluders} eps={params.eps}; mark strength "
          f"{strength:.3g} (perturbation RMS {params.budget} of the carrier's); copies differ from the base by at "
          f"most {change:.2e} of its norm")  # fmt: skip
    return None


def _progress(n: int) -> Progress:
    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(stderr=True), transient=True, disable=n < 2)


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _customers(a: argparse.Namespace) -> list[str]:
    """The customers of one issue: --customer, --customers a,b,c or --customers-file (one name a line)."""
    if a.customers_file is not None:
        names = [line.strip() for line in Path(a.customers_file).read_text().splitlines() if line.strip()]
    elif a.customers is not None:
        names = [n.strip() for n in a.customers.split(",") if n.strip()]
    else:
        names = [a.customer]
    if not names:
        raise InputError("no customer named")
    from securemark.registry import Registry

    for n in names:  # before any name becomes a path
        Registry.check_customer_name(n)
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"customer(s) named twice: {', '.join(twice[:5])}")
    return names


def _targets(a: argparse.Namespace, names: list[str]) -> list[Path]:
    """Where each copy goes, checked before anything is made: --out FILE for one customer given by --customer,
    --out DIR for a list (NAME.safetensors each); never over the base, inside the registry, or over a file that
    exists (a delivered copy) unless --force."""
    from securemark import modelio

    out: Path = a.out
    if a.customer is not None:
        if out.suffix not in modelio.MODEL_SUFFIXES:
            raise modelio.ModelFileError(f"{out}: unknown model format; use one of {', '.join(modelio.MODEL_SUFFIXES)}")
        targets = [out]
    else:
        if out.suffix in modelio.MODEL_SUFFIXES or out.is_file():
            raise InputError(f"{out}: with --customers or --customers-file, --out names a folder (one copy a file)")
        targets = [out / f"{_file_name(n)}.safetensors" for n in names]
        _no_shared_files(names)
    for t in targets:
        if t.resolve() == Path(a.model).resolve() or Path(a.directory).resolve() in t.resolve().parents:
            raise InputError(f"{t}: a copy is never written over the base model or inside the registry")
        if t.is_dir():
            raise InputError(f"{t} is a directory")
        if t.exists() and not a.force:
            raise InputError(f"{t} exists (a copy already delivered?); --force writes over it")
    _check_writable(targets[0])
    return targets


def _file_name(name: str) -> str:
    """A customer's name as the file name of its copy in a batch folder: a plain name, never a path (``../x``,
    ``/abs``, ``a/b``) or a hidden file, so no copy lands outside --out."""
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\"):
        raise InputError(
            f"customer {name!r} cannot name a file in the --out folder: issue it alone (--customer, --out)"
        )
    return name


def _no_shared_files(names: list[str]) -> None:
    """Refuse two customers whose files would be one on a case- or normalization-insensitive file system."""
    seen: dict[str, str] = {}
    for n in names:
        key = unicodedata.normalize("NFC", n).casefold()
        if key in seen:
            raise InputError(f"customers {seen[key]!r} and {n!r} would share one file where names ignore case")
        seen[key] = n


def _check_capacity(reg: Registry, names: list[str]) -> None:
    """A code with a fixed number of rows (BIBD) refuses a batch it cannot serve whole, before any is issued."""
    cap, known = reg.params.capacity, set(reg.customers())
    new = [n for n in names if n not in known]
    if cap is not None and len(known) + len(new) > cap:
        raise InputError(f"the {reg.params.code} code serves {cap} customers; {len(known)} are issued and this batch "
                         f"adds {len(new)}")  # fmt: skip


def _function_spec(config: Path | None) -> FunctionSpec | None:
    """The function mark as a run of ``config`` makes it (its held-out share); None without a config."""
    if config is None:
        return None
    from securemark import data
    from securemark.config import SimConfig
    from securemark.owner import function_spec

    cfg = SimConfig.load(config)
    function = function_spec(cfg, data.server_split(cfg.data, cfg.train.seed)[1])
    if function is None:
        raise InputError(f"{config} puts no function mark in copies (fingerprint off, or function_budget 0)")
    return function


def _check_architecture(record: dict | None, base: dict) -> None:
    """A base the registry's architecture does not describe is refused before a copy is made (its copies
    could never be aligned)."""
    if record is None:
        return
    from securemark.fingerprint.arch import check_covers, groups_of
    from securemark.fingerprint.groups import AlignmentError

    try:
        check_covers(groups_of(record), base, record.get("exempt", []))
    except AlignmentError as exc:
        raise InputError(f"the base is not the registered architecture {record.get('target')}: {exc}") from None


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


def add_issue(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    iss = sub.add_parser("issue", help="issue fingerprinted copies of a model to customers")
    iss.add_argument("directory", type=Path, help="the registry folder")
    iss.add_argument("--model", type=Path, required=True, help="the base model (.safetensors or .pt state_dict)")
    who = iss.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer", help="the customer the copy is for (its code row is drawn the first time)")
    who.add_argument("--customers", metavar="A,B,C", help="several customers, one copy each (--out a folder)")
    who.add_argument("--customers-file", type=Path, metavar="FILE", help="customers one per line (--out a folder)")
    iss.add_argument("--out", type=Path, required=True,
                     help="the copy's file (--customer), or the folder of NAME.safetensors copies")  # fmt: skip
    iss.add_argument("--force", action="store_true", help="write over copies that exist")
    add_json(iss)
    iss.add_argument("--config", type=Path, default=None,
                     help="a simulate config: the copy also carries the function (black-box) mark its runs make, "
                     "fitted on its held-out share (a base that has one recorded always carries it)")  # fmt: skip
    add_arch(iss, "recorded in a registry made without one (refused if it records another)")
    iss.set_defaults(func=cmd_issue)
