"""securemark roster init | rotate | show: the nodes' signing keys for masking under a lying server
(``secagg.threat = "malicious"``; ``securemark.secagg.roster`` says what the files are)."""

from __future__ import annotations

import argparse
from pathlib import Path

from securemark.cli.args import add_json
from securemark.cli.output import _json_or_table
from securemark.errors import InputError


def _members(text: str) -> list[str]:
    """``alice,bob,carol``, or ``N`` for node-1 .. node-N."""
    if text.strip().isdigit():
        n = int(text)
        if not 1 <= n <= 100_000:
            raise argparse.ArgumentTypeError("a number of members must lie in 1..100000")
        return [f"node-{k}" for k in range(1, n + 1)]
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name the members (alice,bob,...) or give their number")
    return names


def _summary(out: Path, roster: object, verb: str) -> dict[str, object]:
    from securemark.secagg.roster import Roster

    assert isinstance(roster, Roster)
    return {
        "roster": str(out / "roster.json"),
        "digest": roster.digest.hex(),
        "members": sorted(roster.members),
        "done": verb,
    }


def cmd_init(a: argparse.Namespace) -> object:
    from securemark.secagg import roster

    made = roster.make(a.members, Path(a.out))
    return _json_or_table(a, _summary(Path(a.out), made, f"made {len(made.members)} keys (NAME.key, mode 0600)"))


def cmd_rotate(a: argparse.Namespace) -> object:
    from securemark.secagg import roster

    folder = Path(a.folder)
    if not (folder / "roster.json").is_file():
        raise InputError(f"{folder} holds no roster.json (securemark roster init)")
    made = roster.rotate(folder, a.member)
    return _json_or_table(a, _summary(folder, made, f"new key for {a.member}; hand out roster.json again"))


def cmd_show(a: argparse.Namespace) -> object:
    from securemark.secagg.roster import Roster

    path = Path(a.roster)
    return _json_or_table(a, _summary(path.parent, Roster.load(path), "read"))


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ros = sub.add_parser("roster", help="signing keys of the nodes (masking under a lying server)")
    rs = ros.add_subparsers(dest="sub", required=True)
    init = rs.add_parser("init", help="a new roster and one private key per member, in a new folder")
    init.add_argument("members", type=_members, help="member names (alice,bob,carol) or their number N")
    init.add_argument("--out", required=True, help="the folder (roster.json and NAME.key files)")
    add_json(init)
    init.set_defaults(func=cmd_init)
    rot = rs.add_parser("rotate", help="a new key for a member (or a new member); the old key kept as NAME.key.old")
    rot.add_argument("folder", help="the roster's folder")
    rot.add_argument("member", help="the member's name")
    add_json(rot)
    rot.set_defaults(func=cmd_rotate)
    show = rs.add_parser("show", help="a roster's members and digest (what every node of a run must share)")
    show.add_argument("roster", help="roster.json")
    add_json(show)
    show.set_defaults(func=cmd_show)
