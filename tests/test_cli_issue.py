"""`securemark issue` for many customers in one call, refusal to overwrite a delivered copy, what issue prints,
a closed pipe, help defaults, and checkpoint variants users save (a wrapped state_dict, DDP's "module.")."""

import json
import os
import subprocess
import sys

import pytest
import torch

from securemark.cli import main
from securemark.modelio import ModelFileError, load_state_dict, match_names, save_state_dict
from securemark.models import build
from securemark.registry import Registry

from .test_cli import ROOT, run


def _registry(tmp_path, capsys):
    base = tmp_path / "base.pt"
    save_state_dict(build("cnn", (1, 8, 8), 10).state_dict(), base)
    reg = tmp_path / "reg"
    assert run(capsys, "registry", "init", str(reg), "--length", "256", "--max-colluders", "3")[0] == 0
    return base, reg


def test_a_batch_issues_the_copies_one_call_each_would(tmp_path, capsys):
    base, reg = _registry(tmp_path, capsys)
    names = [f"c{i:03d}" for i in range(6)]
    (tmp_path / "names.txt").write_text("\n".join(names[3:]) + "\n\n")
    code, out, _ = run(capsys, "issue", str(reg), "--model", str(base), "--customers", ",".join(names[:3]),
                       "--out", str(tmp_path / "batch"), "--json")  # fmt: skip
    assert code == 0
    summary = json.loads(out)
    assert [c["customer"] for c in summary["issued"]] == names[:3]
    assert summary["length"] == 256 and summary["strength"] > 0 and 0 < summary["max_relative_change"] < 0.2
    assert run(capsys, "issue", str(reg), "--model", str(base), "--customers-file", str(tmp_path / "names.txt"),
               "--out", str(tmp_path / "batch"))[0] == 0  # fmt: skip
    with Registry.open(reg) as r:
        assert sorted(d["customer"] for d in r.deliveries()) == names
        rows = {n: r.customer(n, create=False).bits for n in names}
    # a copy is the base plus its own row's mark: issuing the same customer alone gives the same tensors
    for name in names:
        again = tmp_path / f"{name}-again.safetensors"
        assert run(capsys, "issue", str(reg), "--model", str(base), "--customer", name, "--out", str(again))[0] == 0
        batch, single = load_state_dict(tmp_path / "batch" / f"{name}.safetensors"), load_state_dict(again)
        assert all(torch.equal(batch[k], single[k]) for k in single)
    with Registry.open(reg) as r:  # issuing again draws no new row
        assert all((r.customer(n, create=False).bits == rows[n]).all() for n in names)


def test_an_existing_copy_is_never_overwritten_without_force(tmp_path, capsys):
    base, reg = _registry(tmp_path, capsys)
    out = tmp_path / "ann.safetensors"
    assert run(capsys, "issue", str(reg), "--model", str(base), "--customer", "ann", "--out", str(out))[0] == 0
    delivered = out.read_bytes()
    code, _, err = run(capsys, "issue", str(reg), "--model", str(base), "--customer", "bob", "--out", str(out))
    assert code == 2 and "exists" in err and "--force" in err and out.read_bytes() == delivered
    with Registry.open(reg) as r:
        assert r.customers() == ["ann"]  # bob was never recorded
    code, _, err = run(
        capsys, "issue", str(reg), "--model", str(base), "--customers", "cy,ann", "--out", str(tmp_path)
    )  # fmt: skip  (tmp_path/ann.safetensors exists)
    assert code == 2 and "ann.safetensors exists" in err
    again = ["issue", str(reg), "--model", str(base), "--customer", "bob", "--out", str(out), "--force"]
    assert run(capsys, *again)[0] == 0
    assert out.read_bytes() != delivered


@pytest.mark.parametrize(
    ("who", "out", "why"),
    [
        (["--customers", "a,b,a"], "dir", "named twice: a"),
        (["--customers", "a,b"], "copies.safetensors", "--out names a folder"),
        (["--customers", " , "], "dir", "no customer named"),
        (["--customer", "a", "--customers", "b"], "x.pt", "not allowed with"),
        (["--customers", "ok,../escape"], "dir", "cannot name a file in the --out folder"),
        (["--customers", "ok,/tmp/abs"], "dir", "cannot name a file"),
        (["--customers", "ok,sub/x"], "dir", "cannot name a file"),
        (["--customers", "b,./b"], "dir", "cannot name a file"),
        (["--customers", "Ann,ann"], "dir", "would share one file where names ignore case"),
        (["--customers", "ok,a\x00b"], "dir", "control character"),
    ],
)
def test_bad_batches_are_refused_before_anything_is_recorded(tmp_path, capsys, who, out, why):
    base, reg = _registry(tmp_path, capsys)
    with pytest.raises(SystemExit) if "not allowed" in why else _no_raise():
        code, _, err = run(capsys, "issue", str(reg), "--model", str(base), *who, "--out", str(tmp_path / out))
        assert code == 2 and why in err
    with Registry.open(reg) as r:
        assert r.customers() == [] and r.deliveries() == []


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_issue_says_the_codes_strength_and_the_copys_distance(tmp_path, capsys):
    base, reg = _registry(tmp_path, capsys)
    code, out, _ = run(capsys, "issue", str(reg), "--model", str(base), "--customer", "ann",
                       "--out", str(tmp_path / "ann.pt"))  # fmt: skip
    assert code == 0 and "issued" in out and "L=256 c_max=3 eps=0.001" in out and "mark strength" in out


def test_a_reader_that_closes_the_pipe_ends_it_quietly(tmp_path, capsys):
    base, reg = _registry(tmp_path, capsys)
    assert run(capsys, "issue", str(reg), "--model", str(base), "--customers", ",".join(f"c{i}" for i in range(40)),
               "--out", str(tmp_path / "copies"))[0] == 0  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the reader closes its end at once (as `head` does once it has its lines): every write meets a closed pipe
    shell = f"{sys.executable} -m securemark registry show {reg} | (exec 0<&-; sleep 2)"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, env=env, timeout=120)
    assert done.stderr == "" and done.returncode == 141


def test_every_option_with_a_default_shows_it_in_its_help(capsys):
    for argv in (["registry", "init", "--help"], ["trace", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: 2048)" in text if argv[0] == "registry" else "(default: 2000)" in text
        assert "(default: None)" not in text and "(default: False)" not in text


def test_checkpoint_variants_are_read_or_named_with_the_fix(tmp_path):
    sd = build("cnn", (1, 8, 8), 10).state_dict()
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    got = load_state_dict(tmp_path / "ckpt.pt")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "weights": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match=r"it holds 'epoch', 'optimizer'.*model\.state_dict\(\)"):
        load_state_dict(tmp_path / "other.pt")
    ddp = {f"module.{k}": v for k, v in sd.items()}
    assert match_names(ddp, sd.keys()).keys() == sd.keys()  # a copy saved from a DDP-wrapped model
    assert match_names(dict(sd), ddp.keys()).keys() == ddp.keys()  # a base that was
    assert match_names({"x": torch.zeros(1)}, sd.keys()).keys() == {"x"}  # anything else is left for the checks


def test_a_copy_saved_from_a_ddp_wrapped_model_traces_to_its_customer(tmp_path, capsys):
    base, reg = _registry(tmp_path, capsys)
    assert run(capsys, "issue", str(reg), "--model", str(base), "--customers", "ann,ben,cy",
               "--out", str(tmp_path / "copies"))[0] == 0  # fmt: skip
    copy = load_state_dict(tmp_path / "copies" / "ben.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in copy.items()}}, tmp_path / "leak.pt")
    code, out, _ = run(capsys, "trace", str(reg), str(tmp_path / "leak.pt"), "--json")
    assert code == 0 and json.loads(out)["accused"] == ["ben"]


def test_a_batch_a_fixed_size_code_cannot_serve_is_refused_whole(tmp_path, capsys):
    base = tmp_path / "base.pt"
    save_state_dict(build("cnn", (1, 8, 8), 10).state_dict(), base)
    reg = tmp_path / "bibd"
    assert run(capsys, "registry", "init", str(reg), "--code", "bibd", "--max-colluders", "2")[0] == 0
    with Registry.open(reg) as r:
        cap = r.params.capacity
    names = ",".join(f"c{i}" for i in range(cap + 2))
    code, _, err = run(
        capsys, "issue", str(reg), "--model", str(base), "--customers", names, "--out", str(tmp_path / "o")
    )
    assert code == 2 and f"serves {cap} customers" in err
    with Registry.open(reg) as r:
        assert r.customers() == [] and r.deliveries() == []


def test_tied_weights_are_issued_and_sparse_tensors_refused_in_one_line(tmp_path, capsys):
    """An embedding shared with the output layer (one storage, two names) is written as two tensors; a sparse
    tensor is named, not a traceback."""
    emb = torch.nn.Embedding(50, 16)
    tied = {"emb.weight": emb.weight.data, "mid.weight": torch.randn(16, 16), "out.weight": emb.weight.data}
    torch.save(tied, tmp_path / "tied.pt")
    torch.save({"w": torch.eye(4).to_sparse()}, tmp_path / "sparse.pt")
    reg = tmp_path / "reg"
    assert run(capsys, "registry", "init", str(reg), "--length", "64", "--max-colluders", "2")[0] == 0
    argv = ["issue", str(reg), "--model", str(tmp_path / "tied.pt"), "--customer", "a", "--out", str(tmp_path / "a.pt")]
    assert run(capsys, *argv)[0] == 0 and load_state_dict(tmp_path / "a.pt").keys() == tied.keys()
    code, _, err = run(capsys, "issue", str(reg), "--model", str(tmp_path / "sparse.pt"), "--customer", "b",
                       "--out", str(tmp_path / "b.pt"))  # fmt: skip
    assert code == 2 and "sparse tensors" in err and len(err.splitlines()) == 1
