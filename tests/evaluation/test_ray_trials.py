"""Trials as Ray actors give the serial run's records, trial by trial (one local Ray start)."""

import os
import tempfile

import numpy as np
import pytest
import torch

from securemark import data, models
from securemark.evaluation.config import EvalConfig
from securemark.evaluation.harness import plan
from securemark.evaluation.schemes import make_scheme
from securemark.evaluation.trials import Setting, trial
from securemark.registry import Registry, RegistryError

TIMINGS = {"attack_seconds", "tracing_seconds"}


def _setting() -> Setting:
    pool, test = data.load("digits").split(0.2, 0)
    base = models.build("cnn", (1, 8, 8), 10, seed=3).state_dict()
    return Setting(base, pool, test, lambda: models.build("cnn", (1, 8, 8), 10))


def _unpacked() -> set[str]:
    """The registry copies actors unpack (owner key included) in this machine's temp folder."""
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("securemark-trials-")}


def test_ray_actors_reproduce_the_serial_records_and_leave_no_registry_copy(tmp_path, monkeypatch):
    from securemark.flower import ray_trials
    from securemark.flower.ray_trials import RayRunner, ray_runner

    before = _unpacked()
    cfg = EvalConfig.from_dict({
        "code": {"length": 256, "max_colluders": 3},
        "evaluate": {"customers": 20, "schemes": ["tardos", "fedtracker"], "coalition_sizes": [0, 1, 2],
                     "trials": 3, "accuracy_trials": 2},
        "attacks": {"launder": "finetune:epochs=1,lr=0.01,fraction=0.05 > prune:ratio=0.5",
                    "average": "collude:average > quantize:bits=8"},
    })  # fmt: skip
    s = _setting()
    schemes = {name: make_scheme(name, cfg, s.base, tmp_path / "registries") for name in cfg.evaluate.schemes}
    keys = {name: [(a, c, t) for n, a, c in plan(cfg) if n == name for t in range(3)] for name in schemes}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as actors, and the driver beside them, run trials: a fine-tuning step's float32
    try:  # sums depend on the thread count, and training amplified that to 3e-6 of a score (1 run in 2 here)
        serial = {name: [trial(schemes[name], k, s, cfg) for k in keys[name]] for name in schemes}
    finally:
        torch.set_num_threads(threads)
    got: list[dict] = []

    def done(record: dict) -> None:
        assert _unpacked() == before  # no registry copy on disk while trials run
        got.append(record)

    with ray_runner("local", cfg) as run:
        run.share(s)
        for name, scheme in schemes.items():  # both schemes queued before any record is awaited
            run.submit(scheme, keys[name], done)
        run.wait(done)
        assert len(run.actors) == 1  # 2 CPUs: one actor and the driver

        # no CPU free for an actor: the driver runs every trial itself, never waiting on an unplaced actor
        alone: list[dict] = []
        driver_only = RayRunner([], cfg)
        driver_only.share(s)
        driver_only.submit(schemes["tardos"], keys["tardos"][:2], alone.append)
        driver_only.wait(alone.append)
        assert [r["accused"] for r in alone] == [r["accused"] for r in serial["tardos"][:2]]

        # a scheme an actor cannot load: its trials report why, not a KeyError
        broken = RayRunner(run.actors, cfg)
        monkeypatch.setattr(ray_trials, "_payload", lambda scheme: ("registry", {"registry.sqlite": b"junk"}))
        broken.submit(schemes["tardos"], keys["tardos"][:1], done)
        with pytest.raises(RuntimeError, match="could not be loaded on this actor: RegistryError"):
            broken.wait(done)
    by_key = {(r["scheme"], r["attack"], r["coalition_size"], r["trial"]): r for r in got}
    assert sorted(by_key) == sorted((name, *k) for name in schemes for k in keys[name])
    for name in schemes:
        for want in serial[name]:
            have = by_key[(name, want["attack"], want["coalition_size"], want["trial"])]
            for field, value in want.items():  # decisions exactly; scores to float rounding (one torch thread
                if field in TIMINGS:  # everywhere; numpy's BLAS may still split sums by its own thread count)
                    continue
                if isinstance(value, float):
                    assert have[field] == pytest.approx(value, rel=1e-6, nan_ok=True), field
                else:
                    assert have[field] == value, field
    assert _unpacked() == before  # every actor deleted its copy of the registry
    assert serial["tardos"][0]["accuracy"] > 0 and np.isnan(serial["tardos"][2]["accuracy"])
    for scheme in schemes.values():
        scheme.close()


def test_registry_files_round_trip(tmp_path):
    cfg = EvalConfig.from_dict(
        {"code": {"length": 64, "max_colluders": 2}, "evaluate": {"customers": 5, "coalition_sizes": [1]}}
    )
    scheme = make_scheme("tardos", cfg, _setting().base, tmp_path)
    files = scheme.registry.files()
    assert "owner.key" in files and "registry.sqlite" in files and not any(k.endswith("-wal") for k in files)
    copy = Registry.from_files(tmp_path / "copy", files)
    assert copy.customers() == scheme.registry.customers() and copy.secret.key == scheme.registry.secret.key
    assert np.array_equal(copy.codebook()[1], scheme.registry.codebook()[1])
    assert (os.stat(tmp_path / "copy" / "owner.key").st_mode & 0o077) == 0
    copy.close()
    scheme.close()


def test_registry_copies_refuse_foreign_names_and_existing_folders(tmp_path):
    cfg = EvalConfig.from_dict({"code": {"length": 64, "max_colluders": 2},
                                "evaluate": {"customers": 5, "coalition_sizes": [1]}})  # fmt: skip
    scheme = make_scheme("tardos", cfg, _setting().base, tmp_path)
    files = scheme.registry.files()
    for extra in ("../evil", "bases/x.safetensors", "notes.txt"):
        with pytest.raises(RegistryError, match="not a registry's files"):
            Registry.from_files(tmp_path / "copy", {**files, extra: b"x"})
        assert not (tmp_path / "copy").exists()
    (tmp_path / "there").mkdir()
    with pytest.raises(RegistryError, match="already exists"):
        Registry.from_files(tmp_path / "there", files)
    scheme.close()


def test_an_unreachable_cluster_is_refused_quickly():
    from securemark.flower.ray_trials import check_reachable

    with pytest.raises(ConnectionError, match=r"no Ray cluster answers at 127\.0\.0\.1:1"):
        check_reachable("127.0.0.1:1", timeout=2)
