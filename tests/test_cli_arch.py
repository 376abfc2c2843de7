"""The owner registers the model's architecture once (registry init --arch), and a leaked copy rewritten
without changing its outputs (units of every residual stream and block permuted, rescaled, sign-flipped) is
traced; without the architecture the same trace says "not aligned" (exit 3), never a clean "nobody"."""

from __future__ import annotations

import json

import numpy as np
import torch

from securemark import corpus, data
from securemark.attacks import rewrite as R
from securemark.cli import main
from securemark.fingerprint.graph import derive
from securemark.modelio import load_state_dict, save_state_dict

ARCH = ["--arch", "securemark.corpus.resnet:resnet8", "--arch-kwargs", '{"width": 8}', "--example-input", "1,3,32,32"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _base(path):
    torch.manual_seed(0)
    model = corpus.build("resnet8", width=8)
    model.train()
    with torch.no_grad():
        model(data.digits_rgb().x[:128])  # BatchNorm statistics of real images
    save_state_dict(model.state_dict(), path)
    return model


def test_a_rewritten_resnet_copy_is_traced_once_its_architecture_is_registered(tmp_path, capsys):
    model = _base(tmp_path / "base.safetensors")
    registries = {"arch": tmp_path / "with-arch", "plain": tmp_path / "plain"}
    code, out, _ = run(capsys, "registry", "init", registries["arch"], "--length", "512", "--max-colluders", "3", *ARCH)
    assert code == 0 and "6 unit groups from its graph" in out
    assert run(capsys, "registry", "init", registries["plain"], "--length", "512", "--max-colluders", "3")[0] == 0
    for kind, reg in registries.items():
        for c in range(4):
            out_file = tmp_path / f"{kind}-c{c}.safetensors"
            assert run(capsys, "issue", reg, "--model", tmp_path / "base.safetensors", "--customer", f"c{c}",
                       "--out", out_file)[0] == 0  # fmt: skip
    groups = derive(model, torch.zeros(1, 3, 32, 32)).groups
    for kind in registries:
        rng = np.random.default_rng(7)
        copy = load_state_dict(tmp_path / f"{kind}-c2.safetensors")
        leaked, _ = R.rescale(copy, rng, groups=groups)
        leaked, _ = R.signflip(leaked, rng, groups=groups)
        leaked, _ = R.permute(leaked, rng, groups=groups)
        save_state_dict(leaked, tmp_path / f"{kind}-leak.safetensors")

    code, out, _ = run(capsys, "trace", registries["arch"], tmp_path / "arch-leak.safetensors", "--json")
    report = json.loads(out)
    assert code == 0 and report["aligned"] and report["accused"] == ["c2"]
    assert report["alignment"]["permuted"] > 0 and report["alignment"]["flipped"] > 0

    code, out, _ = run(capsys, "trace", registries["plain"], tmp_path / "plain-leak.safetensors")
    assert code == 3
    assert out.startswith("not aligned: ") and "registry init --arch" in out
    assert out.rstrip().endswith("(not aligned)")
    code, out, _ = run(capsys, "trace", registries["plain"], tmp_path / "plain-leak.safetensors", "--json")
    report = json.loads(out)
    assert code == 3 and report["aligned"] is False and report["accused"] == []

    code, out, _ = run(capsys, "trace", registries["plain"], tmp_path / "plain-leak.safetensors", "--json", *ARCH)
    report = json.loads(out)
    assert code == 0 and report["aligned"] and report["accused"] == ["c2"]


def test_an_architecture_that_cannot_be_registered_creates_nothing(tmp_path, capsys):
    cases = [
        (["--arch", "securemark.corpus.nowhere:net", "--example-input", "1,3,32,32"], "cannot import it"),
        (["--arch", "securemark.corpus:build", "--example-input", "1,3,32,32"], "calling it failed"),
        (["--arch", "securemark.corpus:CORPUS", "--example-input", "1,3,32,32"], "calling it failed"),
        (["--arch", "securemark.corpus.net:flower_net", "--example-input", "1,x,3"], "expected sizes"),
        (["--arch", "not a target"], "expected MODULE:CALLABLE"),
        (["--arch", "securemark.corpus.net:flower_net"], "needs --example-input"),
        (["--arch", "securemark.corpus.net:flower_net", "--example-input", "1,3,8,8"], "does not run on an example"),
        (["--arch-kwargs", "{}"], "go with --arch"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "registry", "init", tmp_path / "reg", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "reg").exists()
