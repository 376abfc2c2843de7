import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemark import data
from securemark.config import SimConfig


def test_real_datasets_load_offline_and_shuffled():
    d = data.load_digits()
    assert d.x.shape == (1797, 1, 8, 8) and float(d.x.max()) <= 1.0 and d.classes == 10
    m = data.load_mnist5k()
    assert m.x.shape == (5000, 1, 28, 28) and len(set(m.y[:50].tolist())) > 5  # shuffled, not sorted by label


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(data.PARTITIONS), st.integers(1, 30), st.integers(0, 2**31))
def test_partitions_cover_every_example_exactly_once(scheme, clients, seed):
    labels = np.random.default_rng(seed).integers(0, 10, 600)
    parts = data.partition(labels, clients, scheme, np.random.default_rng(seed), alpha=0.3, classes=2)
    allidx = np.concatenate(parts)
    assert len(parts) == clients and all(len(p) > 0 for p in parts)
    assert len(allidx) == 600 and len(np.unique(allidx)) == 600


def test_non_iid_schemes_skew_labels():
    labels = data.load_digits().y.numpy()
    rng = np.random.default_rng(0)
    path = data.partition(labels, 10, "pathological", rng, classes=2)
    assert max(len(np.unique(labels[p])) for p in path) <= 3  # 2 shards may straddle a label boundary
    iid = data.partition(labels, 10, "iid", rng)
    assert min(len(np.unique(labels[p])) for p in iid) == 10


def test_client_split_never_includes_the_servers_held_out_share():
    train, test = data.load("digits", 0).split(0.2, 0)
    parts = [data.client_split("digits", k, 4, "iid", 0, test_fraction=0.2) for k in range(4)]
    assert sum(len(p) for p in parts) == len(train)
    held_out = {tuple(x.reshape(-1).tolist()) for x in test.x[:50]}
    seen = {tuple(x.reshape(-1).tolist()) for p in parts for x in p.x}
    assert not held_out & seen or len(held_out & seen) < 5  # digits has a few exact duplicate images


def test_bad_partition_requests():
    with pytest.raises(ValueError, match="unknown partition"):
        data.partition(np.zeros(10), 2, "nope", np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot split"):
        data.partition(np.zeros(3), 5, "iid", np.random.default_rng(0))
    with pytest.raises(ValueError, match="partition-id"):
        data.client_split("digits", 4, 4, "iid", 0)


def _parquet(path, column, images, labels):
    import datasets

    feats = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    datasets.Dataset.from_dict({column: list(images), "label": labels}, features=feats).to_parquet(str(path))
    return str(path)


def test_flwr_datasets_loaders_read_local_parquet_files_offline(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = [i % 10 for i in range(12)]
    files = _parquet(tmp_path / "mnist.parquet", "image", [Image.fromarray(a) for a in gray], labels)
    ds = data.load("mnist", seed=0, files=files)
    assert ds.x.shape == (12, 1, 28, 28) and ds.classes == 10
    # the loader shuffles; every image comes back once, scaled to [0, 1], with its own label
    got = {(int(y), round(float(x.sum()) * 255)) for x, y in zip(ds.x, ds.y, strict=True)}
    assert got == {(lab, int(a.astype(np.int64).sum())) for a, lab in zip(gray, labels, strict=True)}

    rgb = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    files = _parquet(tmp_path / "cifar.parquet", "img", [Image.fromarray(a) for a in rgb], labels[:6])
    cifar = data.load("cifar10", seed=0, files=files)
    assert cifar.x.shape == (6, 3, 32, 32)
    first = int(np.flatnonzero(cifar.y.numpy() == 0)[0])
    np.testing.assert_allclose(cifar.x[first].numpy(), rgb[0].transpose(2, 0, 1) / 255.0, atol=1e-6)

    cfg = SimConfig.from_dict({"data": {"name": "cifar10", "files": files, "test_fraction": 0.5}})
    parts = [data.client_data(cfg.data, i, 3, seed=0) for i in range(3)]
    assert sum(len(p) for p in parts) == 3  # half held out for the server, the rest split among 3 clients

    with pytest.raises(ValueError, match="expected columns"):
        data.load("cifar10", files=_parquet(tmp_path / "wrong.parquet", "image", [Image.fromarray(rgb[0])], [1]))


def test_sample_draws_a_fraction_without_repeats_and_rejects_bad_fractions():
    d = data.synthetic(n=200)
    part = d.sample(0.1, np.random.default_rng(0))
    assert len(part) == 20 and len(d.sample(1e-9, np.random.default_rng(0))) == 1  # at least one example
    rows = {tuple(x.reshape(-1).tolist()) for x in part.x}
    assert len(rows) == 20 and rows <= {tuple(x.reshape(-1).tolist()) for x in d.x}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            d.sample(bad, np.random.default_rng(0))
