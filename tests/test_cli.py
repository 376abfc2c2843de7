import json
import os
from pathlib import Path

import pytest

from securemark.cli import main
from securemark.modelio import load_state_dict, save_state_dict
from securemark.models import build

ROOT = Path(__file__).resolve().parents[1]


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
        (["codes", "eval", "--eps", "2"], "eps must lie in (0, 1)"),
        (["trace", "{tmp}/none"], "trace needs exactly one suspect"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and message in err and "Traceback" not in err


def test_bench_trace_small(capsys):
    code, out, _ = run(capsys, "bench", "trace", "--users", "3000", "--length", "2048", "--repeats", "2", "--json")
    r = json.loads(out)
    assert code == 0 and r["users"] == 3000 and r["accused_innocents"] == 0 and r["accused_colluders"] >= 1


def test_bench_align_small(capsys):
    code, out, _ = run(capsys, "bench", "align", "--small", "--repeats", "1", "--json")
    row, resnet, vit = json.loads(out)["models"]
    assert code == 0 and row["model"] == "quickstart-cnn" and row["params"] == 105_866
    assert row["units_merged"] == 6 and row["units_dropped"] == 12  # 2 splits and 4 dummies in each of 3 layers
    assert row["mark_cosine"] > 0.99 and row["mark_coordinates_recovered"] > 0.9
    assert (resnet["model"], vit["model"]) == ("resnet18", "vit-tiny")
    assert resnet["units_flipped"] > 0 and resnet["units_permuted"] > 0 and vit["units_permuted"] > 0
    assert min(resnet["mark_cosine"], vit["mark_cosine"]) > 0.99


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


def test_cli_censoring_choices_match_the_bench():
    from securemark.bench.censored import CENSORS
    from securemark.cli import CENSORED

    assert tuple(CENSORS) == CENSORED


def test_cli_collusion_choices_match_the_attacks():
    from securemark import attacks, cli

    assert cli.COLLUSION_METHODS == attacks.COLLUSION_METHODS


def test_cli_model_suffixes_match_modelio():
    from securemark.cli.suspects import MODEL_SUFFIXES
    from securemark.modelio import MODEL_SUFFIXES as READ

    assert MODEL_SUFFIXES == READ


# --- owner-side hardening of registry init and issue ----------------------------------------------------
def _owner_setup(tmp_path, capsys, customers=("ann", "ben", "cat")):
    base = tmp_path / "base.pt"
    save_state_dict(build("cnn", (1, 8, 8), 10).state_dict(), base)
    reg = tmp_path / "reg"
    assert run(capsys, "registry", "init", str(reg), "--length", "256", "--max-colluders", "3")[0] == 0
    for name in customers:
        out = str(tmp_path / f"{name}.safetensors")
        assert run(capsys, "issue", str(reg), "--model", str(base), "--customer", name, "--out", out)[0] == 0
    return base, reg


def _registry_state(reg):
    from securemark.registry import Registry

    with Registry.open(reg) as r:
        return r.customers(), r.deliveries(), r.base()


def test_issue_refuses_an_unknown_suffix_before_recording_anything(tmp_path, capsys):
    base, reg = _owner_setup(tmp_path, capsys, customers=())
    code, _, err = run(capsys, "issue", str(reg), "--model", str(base), "--customer", "eve", "--out", "eve.onnx")
    assert code == 2 and "unknown model format" in err and len(err.splitlines()) == 1
    assert _registry_state(reg) == ([], [], None)


def test_issue_records_the_delivery_only_once_the_file_is_written(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from securemark import modelio

    base, reg = _owner_setup(tmp_path, capsys, customers=())

    def full_disk(sd, path):
        Path(path).write_bytes(b"half a model")
        raise PermissionError(f"{path}: disk says no")

    monkeypatch.setattr(modelio, "save_state_dict", full_disk)
    out = tmp_path / "out" / "eve.pt"
    out.parent.mkdir()
    code, _, err = run(capsys, "issue", str(reg), "--model", str(base), "--customer", "eve", "--out", str(out))
    assert code == 2 and "disk says no" in err
    assert list(out.parent.iterdir()) == []  # neither the copy nor a partial file
    assert _registry_state(reg)[1] == []
    monkeypatch.undo()
    assert run(capsys, "issue", str(reg), "--model", str(base), "--customer", "eve", "--out", str(out))[0] == 0
    assert [(d["customer"], d["note"]) for d in _registry_state(reg)[1]] == [("eve", str(out))]


def test_issue_refuses_a_nan_or_all_zero_base(tmp_path, capsys):
    import torch

    _, reg = _owner_setup(tmp_path, capsys, customers=())
    sd = build("cnn", (1, 8, 8), 10).state_dict()
    sd["features.0.weight"][0, 0, 0, 0] = float("nan")
    save_state_dict(sd, tmp_path / "nan.pt")
    save_state_dict({k: torch.zeros_like(v) for k, v in sd.items()}, tmp_path / "zero.pt")
    for model, message in (("nan.pt", "tensor 'features.0.weight' holds NaN or inf"), ("zero.pt", "all zero")):
        out = tmp_path / f"copy-{model}"
        argv = ["issue", str(reg), "--model", str(tmp_path / model), "--customer", "eve", "--out", str(out)]
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1
        assert not out.exists()
    assert _registry_state(reg) == ([], [], None)


def test_attacks_issue_and_demo_refuse_bad_values_in_one_line(tmp_path, capsys):
    """Values a command's library functions refuse (InputError, ConfigError) end in one line and exit 2."""
    import torch

    _owner_setup(tmp_path, capsys, customers=("ann",))
    ann, out = str(tmp_path / "ann.safetensors"), str(tmp_path / "out.pt")
    save_state_dict(build("mlp", (1, 8, 8), 10).state_dict(), tmp_path / "mlp.pt")
    save_state_dict({"w": torch.randn(3, 3)}, tmp_path / "tiny.pt")
    save_state_dict({"bias": torch.randn(3), "step": torch.tensor([7])}, tmp_path / "flat.pt")
    (tmp_path / "unmarked.toml").write_text("[fingerprint]\nenabled = false\n")
    big = tmp_path / "big"
    assert run(capsys, "registry", "init", str(big))[0] == 0
    cases = [
        (["attack", "collude", ann, "--out", out], "collusion needs at least 2 copies, got 1"),
        (["attack", "collude", ann, str(tmp_path / "mlp.pt"), "--out", out], "does not have the same tensors"),
        (["attack", "prune", ann, "--ratio", "1.5", "--out", out], "prune ratio must lie in [0, 1), got 1.5"),
        (["attack", "noise", ann, "--std", "-1", "--out", out], "noise std must be >= 0"),
        (["issue", str(big), "--model", str(tmp_path / "tiny.pt"), "--customer", "eve", "--out", out],
         "the carrier has 9 coordinates, fewer than the code length 2048"),
        (["demo", "--config", str(tmp_path / "unmarked.toml"), "--out", str(tmp_path / "demo")],
         "fingerprint.enabled must be true"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "demo").exists()
    # a model without weight matrices is left as it is, by prune as by quantize and noise
    assert run(capsys, "attack", "prune", str(tmp_path / "flat.pt"), "--ratio", "0.5", "--out", out)[0] == 0
    assert torch.equal(load_state_dict(out)["bias"], load_state_dict(tmp_path / "flat.pt")["bias"])


@pytest.mark.parametrize("flag", [("--budget", "-1"), ("--eps", "2")])
def test_registry_init_with_bad_parameters_creates_nothing(tmp_path, capsys, flag):
    code, _, err = run(capsys, "registry", "init", str(tmp_path / "r"), *flag)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", [("--budget", "nan"), ("--budget", "inf"), ("--eps", "nan"), ("--length", "0")])
def test_non_finite_or_non_positive_options_are_refused_by_the_parser(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stop:
        main(["registry", "init", str(tmp_path / "r"), *flag])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {flag[0]}: must be" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_group_readable_registry_is_refused(tmp_path, capsys):
    _, reg = _owner_setup(tmp_path, capsys, customers=())
    (reg / "registry.sqlite").chmod(0o644)
    code, _, err = run(capsys, "registry", "show", str(reg))
    assert code == 2 and "chmod 600" in err and len(err.splitlines()) == 1


def _commands(tmp_path, reg, base):
    return (
        ["registry", "show", str(reg)],
        ["issue", str(reg), "--model", str(base), "--customer", "zed", "--out", str(tmp_path / "zed.pt")],
        ["trace", str(reg), str(tmp_path / "ann.safetensors"), "--json"],
    )


def test_a_corrupted_registry_gives_one_line_and_exit_2(tmp_path, capsys):
    import os
    import shutil

    base, reg = _owner_setup(tmp_path, capsys)
    pristine = tmp_path / "pristine"
    shutil.copytree(reg, pristine)
    db = reg / "registry.sqlite"
    size = db.stat().st_size

    def corrupt(offset=None, truncate=None):
        shutil.rmtree(reg)
        shutil.copytree(pristine, reg)
        if truncate is not None:
            os.truncate(db, truncate)
        else:
            with open(db, "r+b") as fh:
                fh.seek(offset)
                fh.write(b"\xa5" * 64)

    for how in ({"truncate": size // 2}, {"offset": 100}):  # half the pages; the first b-tree page
        corrupt(**how)
        for argv in _commands(tmp_path, reg, base):
            code, _, err = run(capsys, *argv)
            assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (how, argv, err)
    failed = 0
    for page in range(1, size // 4096):  # every page header: a command either works or fails in one line
        corrupt(offset=page * 4096 + 8)
        for argv in _commands(tmp_path, reg, base):
            code, _, err = run(capsys, *argv)
            assert code in (0, 2) and (code == 0 or len(err.splitlines()) == 1), (page, argv, err)
            failed += code == 2
    assert failed > 0


def test_trace_of_a_nan_suspect_is_exit_2_and_json_is_strict(tmp_path, capsys):
    import torch

    from securemark.cli import main
    from securemark.modelio import save_state_dict
    from securemark.models import build

    reg = tmp_path / "reg"
    assert main(["registry", "init", str(reg), "--length", "64", "--max-colluders", "2"]) == 0
    model = tmp_path / "base.safetensors"
    save_state_dict(build("cnn", (1, 8, 8), 10).state_dict(), model)
    assert main(["issue", str(reg), "--model", str(model), "--customer", "ann", "--out", str(tmp_path / "a.pt")]) == 0
    capsys.readouterr()
    zero = {k: torch.zeros_like(v) for k, v in build("cnn", (1, 8, 8), 10).state_dict().items()}
    save_state_dict(zero, tmp_path / "zero.pt")  # extracts to a finite observation; JSON must stay strict
    assert main(["trace", str(reg), str(tmp_path / "zero.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert "bound" in report and report["alignment"]["status"].startswith("aligned")
    nan = dict(zero)
    nan["head.3.weight"] = torch.full_like(zero["head.3.weight"], float("nan"))
    save_state_dict(nan, tmp_path / "nan.pt")
    assert main(["trace", str(reg), str(tmp_path / "nan.pt"), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'head.3.weight' holds nan" in err[0]


NOISY_COMMAND = """
import ctypes, logging, os, sys
from securemark import cli
from securemark.cli import bench

cached = sys.stdout  # a library that kept the stream object before the command started

def noisy(a):
    print("a progress line")
    cached.write("a cached-stream line\\n")
    ctypes.CDLL(None).printf(b"a C stdio line\\n")
    os.write(1, b"a line from native code\\n")
    logging.basicConfig(stream=sys.__stdout__)  # a handler bound to the original stdout object
    logging.getLogger("some.lib").warning("a log line")
    return {"ok": float("nan"), "n": 3}

bench.cmd_bench_trace = noisy
raise SystemExit(cli.main(["bench", "trace", "--json"]))
"""


def test_json_owns_stdout_whatever_else_writes_there():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffers as in a plain shell
    done = subprocess.run([sys.executable, "-c", NOISY_COMMAND], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": None, "n": 3}  # strict JSON: NaN is null
    for line in ("a progress line", "a cached-stream line", "a C stdio line", "a line from native code", "a log line"):
        assert line in done.stderr


def test_refusals_before_any_work_exit_2_with_one_line(tmp_path, capsys):
    config = str(ROOT / "configs" / "collusion-smoke.toml")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")
    assert main(["evaluate", config, "--out", str(tmp_path / "done")]) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert main(["evaluate", config, "--out", str(tmp_path / "new"), "--ray", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--ray 'bogus'" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    assert main(["evaluate", str(tmp_path)]) == 2  # a folder, not a config
    assert "securemark: error:" in capsys.readouterr().err


def test_issue_with_a_function_mark_and_its_black_box_trace(tmp_path, capsys):
    """--config fits the function mark a run of that config makes; a base with one recorded carries it in
    every later copy; a registry whose white-box carrier covers the edited layer is refused."""
    import torch

    from securemark.fingerprint.function import last_linear

    model = build("cnn", (1, 8, 8), 10, seed=3)
    save_state_dict(model.state_dict(), tmp_path / "base.pt")
    layer, _ = last_linear(model)
    config = str(ROOT / "configs" / "smoke.toml")

    def issue(reg, name, *extra):
        argv = ["issue", str(reg), "--model", str(tmp_path / "base.pt"), "--customer", name]
        return run(capsys, *argv, "--out", str(tmp_path / f"{name}.pt"), *extra)

    plain = tmp_path / "plain"
    assert run(capsys, "registry", "init", str(plain), "--length", "256", "--max-colluders", "3")[0] == 0
    code, _, err = issue(plain, "eve", "--config", config)
    assert code == 2 and f"--exclude '{layer}.*'" in err and len(err.splitlines()) == 1
    assert _registry_state(plain)[:2] == ([], [])
    reg = tmp_path / "reg"
    init = ["registry", "init", str(reg), "--length", "256", "--max-colluders", "3", "--exclude", f"{layer}.*"]
    assert run(capsys, *init)[0] == 0
    assert issue(reg, "ann", "--config", config)[0] == 0
    assert issue(reg, "bob")[0] == 0  # no --config: the mark recorded for this base
    for name in ("ann", "bob"):
        scripted = tmp_path / f"{name}.ts"
        copy = build("cnn", (1, 8, 8), 10)
        copy.load_state_dict(load_state_dict(tmp_path / f"{name}.pt"))
        torch.jit.save(torch.jit.script(copy.eval()), str(scripted))
        code, out, _ = run(capsys, "trace", str(reg), "--query-model", str(scripted), "--queries", "800", "--json")
        assert code == 0 and json.loads(out)["accused"] == [name]
        code, out, _ = run(capsys, "trace", str(reg), str(tmp_path / f"{name}.pt"), "--json")
        assert code == 0 and json.loads(out)["accused"] == [name]  # the white-box mark is intact beside it
    nobody = tmp_path / "base.ts"
    torch.jit.save(torch.jit.script(model.eval()), str(nobody))
    code, out, _ = run(capsys, "trace", str(reg), "--query-model", str(nobody), "--queries", "800", "--json")
    assert code == 0 and json.loads(out)["accused"] == []


def test_a_refused_issue_records_nothing(tmp_path, capsys):
    """Every check runs before the registry is written: the wrong model for the config, a model with other
    classes, a bad name, an --out that cannot be written, a BIBD code, a second --config that asks for
    another mark than the one recorded."""
    import tomllib

    from securemark.fingerprint.function import last_linear

    config = ROOT / "configs" / "smoke.toml"
    layer, _ = last_linear(build("cnn", (1, 8, 8), 10))
    save_state_dict(build("cnn", (1, 8, 8), 10, seed=1).state_dict(), tmp_path / "base.pt")
    save_state_dict(build("mlp", (1, 8, 8), 10).state_dict(), tmp_path / "mlp.pt")
    save_state_dict(build("cnn", (1, 8, 8), 3).state_dict(), tmp_path / "three.pt")
    raw = tomllib.loads(config.read_text())
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace("budget = 0.05", "budget = 0.05\nfunction_budget = 0.5"))
    assert (
        tomllib.loads(other.read_text())["fingerprint"]["function_budget"]
        == 0.5
        != raw["fingerprint"].get("function_budget", 0.03)
    )
    (tmp_path / "adir.pt").mkdir()
    reg, bibd = tmp_path / "reg", tmp_path / "bibd"
    exclude = ["--exclude", f"{layer}.*"]
    assert run(capsys, "registry", "init", str(reg), "--length", "256", "--max-colluders", "3", *exclude)[0] == 0
    assert run(capsys, "registry", "init", str(bibd), "--code", "bibd", "--max-colluders", "3", *exclude)[0] == 0
    cases = [
        (reg, "mlp.pt", "alice", "alice.pt", "is not the cnn model the config names"),
        (reg, "three.pt", "alice", "alice.pt", "is not the cnn model the config names"),
        (reg, "base.pt", " alice", "alice.pt", "surrounding spaces"),
        (reg, "base.pt", "alice", "adir.pt", "is a directory"),
        (reg, "base.pt", "alice", "base.pt/alice.pt", "cannot write there"),
        (reg, "base.pt", "alice", "base.pt", "never written over the base model or inside the registry"),
        (reg, "base.pt", "alice", "reg/alice.pt", "never written over the base model or inside the registry"),
        (bibd, "base.pt", "alice", "alice.pt", "this registry uses BIBD"),
    ]
    for directory, model, name, out, message in cases:
        argv = ["issue", str(directory), "--model", str(tmp_path / model), "--customer", name]
        code, _, err = run(capsys, *argv, "--out", str(tmp_path / out), "--config", str(config))
        assert code == 2 and message in err and len(err.splitlines()) == 1, (model, name, out, err)
        assert _registry_state(directory) == ([], [], None), (model, name, out)
        assert not (tmp_path / "alice.pt").exists()
    argv = ["issue", str(reg), "--model", str(tmp_path / "base.pt"), "--customer", "ann", "--out"]
    assert run(capsys, *argv, str(tmp_path / "ann.pt"), "--config", str(config))[0] == 0
    argv[5] = "bob"
    code, _, err = run(capsys, *argv, str(tmp_path / "bob.pt"), "--config", str(other))
    assert code == 2 and "recorded already, differently (budget: recorded 0.03, asked 0.5)" in err
    assert _registry_state(reg)[0] == ["ann"] and not (tmp_path / "bob.pt").exists()
    wide = tmp_path / "wide.toml"  # the default width spelled out is the same model: not "differently"
    wide.write_text(config.read_text().replace('[model]\nname = "cnn"', '[model]\nname = "cnn"\nwidth = 16'))
    assert tomllib.loads(wide.read_text())["model"]["width"] == 16
    argv[5] = "cy"
    assert run(capsys, *argv, str(tmp_path / "cy.pt"), "--config", str(wide))[0] == 0
    # a base whose copies went out without a function mark never gets one later (they would lack it)
    late = tmp_path / "late"
    assert run(capsys, "registry", "init", str(late), "--length", "256", "--max-colluders", "3", *exclude)[0] == 0
    argv = ["issue", str(late), "--model", str(tmp_path / "base.pt"), "--customer", "cy", "--out"]
    assert run(capsys, *argv, str(tmp_path / "cy-late.pt"))[0] == 0  # (cy.pt holds the copy delivered above)
    argv[5] = "di"
    code, _, err = run(capsys, *argv, str(tmp_path / "di.pt"), "--config", str(config))
    assert code == 2 and "issued without a function mark" in err and _registry_state(late)[0] == ["cy"]


def test_a_binary_file_given_as_a_config_is_not_quoted(tmp_path, capsys):
    key = tmp_path / "owner.key"
    key.write_bytes(bytes([0x04, 0x2C, 0xCD, 0xFF]) * 8)
    for argv in (["evaluate", str(key)], ["simulate", str(key)]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "not a UTF-8 text file" in err and "0xcd" not in err + out and "0xff" not in err + out


def test_sigterm_unwinds_a_bench_like_ctrl_c_and_removes_its_throwaway_registry(tmp_path):
    """A bench's registry (with its owner key) lives in a temporary directory; SIGTERM used to leave it."""
    import signal
    import subprocess
    import sys
    import time

    import torch

    base = tmp_path / "base.pt"
    torch.save(build("cnn", (1, 28, 28), 10, seed=0).state_dict(), base)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    argv = [
        sys.executable,
        "-m",
        "securemark.cli",
        "bench",
        "blackbox",
        "--base",
        str(base),
        "--customers",
        "50",
        "--trials",
        "50",
        "--archs",
        "cnn",
        "--temperatures",
        "4",
        "--colluders",
        "1",
        "--triggers",
        "0",
    ]
    proc = subprocess.Popen(argv, env={**os.environ, "TMPDIR": str(scratch)}, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while not list(scratch.glob("securemark-bb-*/registry")) and time.monotonic() < end:
            time.sleep(0.2)
        assert list(scratch.glob("securemark-bb-*/registry")), "the bench made no registry"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "securemark: terminated" in err
    assert not list(scratch.glob("securemark-bb-*")), "the throwaway registry and its owner key are left behind"


def test_refusals_added_after_an_attack_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    """A simulation in which no round completed, an empty alignment spec and a coalition larger than the
    users are refused with one line and exit 2, never reported as a success."""
    import securemark.sim

    failed = {"rounds": [{"round": 1, "status": "failed", "reason": "1 node(s) connected, the strategy asks for 4"}]}
    monkeypatch.setattr(securemark.sim, "simulate", lambda cfg, out, resume=False: failed)
    smoke = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
    assert main(["simulate", smoke, "--out", str(tmp_path / "run")]) == 2
    assert "no round of 1 completed (1 node(s) connected" in capsys.readouterr().err
    (tmp_path / "groups.json").write_text("[]")
    from securemark.fingerprint.groups import AlignmentError, load_groups

    with pytest.raises(AlignmentError, match="at least one"):
        load_groups(tmp_path / "groups.json")
    assert main(["bench", "trace", "--users", "1", "--max-colluders", "5"]) == 2
    err = capsys.readouterr().err
    assert "at least as many users" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_python_m_securemark_runs_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "securemark", "codes", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: securemark codes")
