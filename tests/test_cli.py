import json

import pytest

from securemark.cli import main
from securemark.modelio import load_state_dict, save_state_dict
from securemark.models import build


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_codes_eval_json(capsys):
    code, out, _ = run(
        capsys,
        "codes",
        "eval",
        "--users",
        "100",
        "--colluders",
        "2",
        "--length",
        "256",
        "--attack",
        "interleave",
        "--trials",
        "20",
        "--json",
    )
    r = json.loads(out)
    assert code == 0
    for key in (
        "catch_rate",
        "all_caught_rate",
        "false_accusations",
        "trials_with_false_accusation",
        "mean_accused",
        "threshold",
        "length",
        "users",
        "colluders",
        "attack",
        "seconds",
    ):
        assert key in r
    assert r["catch_rate"] == 1.0 and r["users"] == 100


def test_owner_workflow_through_the_cli(tmp_path, capsys):
    base = tmp_path / "base.pt"
    save_state_dict(build("cnn", (1, 8, 8), 10).state_dict(), base)
    reg = tmp_path / "reg"
    assert run(capsys, "registry", "init", str(reg), "--length", "512", "--max-colluders", "3")[0] == 0
    for name in ("ann", "ben", "cat", "dan"):
        assert (
            run(
                capsys,
                "issue",
                str(reg),
                "--model",
                str(base),
                "--customer",
                name,
                "--out",
                str(tmp_path / f"{name}.safetensors"),
            )[0]
            == 0
        )
    files = [str(tmp_path / f"{n}.safetensors") for n in ("ann", "cat")]
    assert run(capsys, "attack", "collude", *files, "--method", "average", "--out", str(tmp_path / "m.pt"))[0] == 0
    assert (
        run(capsys, "attack", "prune", str(tmp_path / "m.pt"), "--ratio", "0.2", "--out", str(tmp_path / "p.pt"))[0]
        == 0
    )
    assert (
        run(capsys, "attack", "quantize", str(tmp_path / "p.pt"), "--bits", "8", "--out", str(tmp_path / "q.pt"))[0]
        == 0
    )
    assert (
        run(capsys, "attack", "noise", str(tmp_path / "q.pt"), "--std", "0.0001", "--out", str(tmp_path / "n.pt"))[0]
        == 0
    )
    code, out, _ = run(capsys, "trace", str(reg), str(tmp_path / "n.pt"), "--json")
    r = json.loads(out)
    assert code == 0 and set(r["accused"]) == {"ann", "cat"}
    assert {"threshold", "eps", "scores_top"} <= set(r) and {"customer", "score"} <= set(r["scores_top"][0])
    code, out, _ = run(capsys, "registry", "show", str(reg))
    shown = json.loads(out)
    assert shown["customers"] == ["ann", "ben", "cat", "dan"] and len(shown["deliveries"]) == 4
    assert (reg / "owner.key").read_bytes().hex() not in out
    assert load_state_dict(tmp_path / "ann.safetensors").keys() == load_state_dict(base).keys()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trace", "{tmp}/none", "{tmp}/x.pt"], "does not exist"),
        (["registry", "show", "{tmp}/none"], "no registry at"),
        (["registry", "init", "{tmp}/r", "--eps", "2"], "0 < eps < 1"),
        (["codes", "eval", "--users", "5", "--colluders", "9"], "colluders <= users"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and message in err and "Traceback" not in err


def test_bench_trace_small(capsys):
    code, out, _ = run(capsys, "bench", "trace", "--users", "3000", "--length", "2048", "--repeats", "2", "--json")
    r = json.loads(out)
    assert code == 0 and r["users"] == 3000 and r["accused_innocents"] == 0 and r["accused_colluders"] >= 1


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_bench_secagg_small(capsys, graph):
    code, out, _ = run(
        capsys,
        "bench",
        "secagg",
        "--clients",
        "12",
        "--params",
        "2000",
        "--graph",
        graph,
        "--dropout",
        "0.25",
        "--json",
    )
    r = json.loads(out)
    assert code == 0 and r["exact"] is True and r["dropped"] == 3
    assert r["max_abs_error"] <= r["quantization_step"]
    for key in ("plain_seconds", "masked_seconds", "prg_bytes_per_second", "mask_bytes_per_second", "clipped"):
        assert key in r


def test_cli_collusion_choices_match_the_attacks():
    from securemark import attacks, cli

    assert cli.COLLUSION_METHODS == attacks.COLLUSION_METHODS
