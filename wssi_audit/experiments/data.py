"""Datasets for the experiments: inputs in [0, 1]; a fixed train/validation/test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0  # the split never changes with the run's seed: seeds vary init and batch order


@dataclass
class Dataset:
    """A split dataset; tensors are float32 in [0, 1] with the model's input shape."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    mean: float  # training-set statistics, applied inside the model
    std: float

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (taken, rest), taking `fraction` of every class."""
    taken, rest = [], []
    for label in np.unique(y):
        index = rng.permutation(np.flatnonzero(y == label))
        k = max(1, round(fraction * len(index)))
        taken.append(index[:k])
        rest.append(index[k:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def _finish(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    subsample: float,
    classes: int,
    val_fraction: float = 0.2,
) -> Dataset:
    rng = np.random.default_rng(SPLIT_SEED)
    val_index, train_index = _stratified_split(y, val_fraction, rng)
    if subsample < 1.0:
        train_index = train_index[_stratified_split(y[train_index], subsample, rng)[0]]
    x_train = x[train_index]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    return Dataset(
        name=name if subsample >= 1.0 else f"{name}@{subsample:g}",
        x_train=tensor(x_train),
        y_train=torch.as_tensor(y[train_index], dtype=torch.long),
        x_val=tensor(x[val_index]),
        y_val=torch.as_tensor(y[val_index], dtype=torch.long),
        x_test=tensor(x_test),
        y_test=torch.as_tensor(y_test, dtype=torch.long),
        classes=classes,
        mean=float(x_train.mean()),
        std=float(x_train.std()),
    )


def load_digits(subsample: float = 1.0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images), scaled to [0, 1]; 30 % test, 20 % of the rest validation."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    test_index, rest = _stratified_split(y, 0.3, np.random.default_rng(SPLIT_SEED + 1))
    return _finish("digits", x[rest], y[rest], x[test_index], y[test_index], subsample, 10)


def mnist1d_available() -> bool:
    try:
        import mnist1d.data  # noqa: F401
    except ImportError:
        return False
    return True


def load_mnist1d(subsample: float = 1.0) -> Dataset:
    """MNIST-1D (4000 train / 1000 test, length 40), generated offline; min-max scaled to [0, 1]
    with the training set's range (test values outside it are clipped)."""
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())
    x, x_test = np.asarray(raw["x"], dtype=np.float64), np.asarray(raw["x_test"], dtype=np.float64)
    low, high = x.min(), x.max()
    x = ((x - low) / (high - low)).reshape(-1, 1, x.shape[1])
    x_test = np.clip((x_test - low) / (high - low), 0.0, 1.0).reshape(-1, 1, x_test.shape[1])
    y, y_test = np.asarray(raw["y"], dtype=np.int64), np.asarray(raw["y_test"], dtype=np.int64)
    return _finish("mnist1d", x, y, x_test, y_test, subsample, 10)


_CACHE: dict[tuple[str, float], Dataset] = {}


def load_dataset(name: str, subsample: float = 1.0) -> Dataset:
    """`digits` or `mnist1d`, optionally keeping only `subsample` of the training split (stratified)."""
    key = (name, subsample)
    if key not in _CACHE:
        if name == "digits":
            _CACHE[key] = load_digits(subsample)
        elif name == "mnist1d":
            _CACHE[key] = load_mnist1d(subsample)
        else:
            raise KeyError(f"unknown dataset '{name}' (digits, mnist1d)")
    return _CACHE[key]
