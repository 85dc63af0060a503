"""Data for fine-tuning: sklearn's digits, a folder of images in class subfolders, or a .pt/.npz file.

Everything is loaded into memory as float32 tensors (the small data sets this command is for), then
split into a training part and a held-out part with a seeded permutation, so a run is repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, describe

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass
class Dataset:
    x: torch.Tensor  # float32, (N, ...)
    y: torch.Tensor  # int64, (N,)
    classes: list[str]
    description: str


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    description: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return Dataset(x, y, [str(c) for c in range(10)], "digits (scikit-learn, 1797 images 1x8x8)")


def _load_tensor_file(path: Path) -> Dataset:
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive or "y" not in archive:
                    found = ", ".join(archive.files)
                    raise InputError(f"{path.name} must hold arrays named 'x' and 'y' (found {found})")
                x, y = torch.from_numpy(archive["x"].copy()), torch.from_numpy(archive["y"].copy())
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"cannot read {path.name}: {describe(error)}") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise InputError(f"cannot read {path.name}: {describe(error)}") from None
        if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
            raise InputError(f"{path.name} must hold a dict with tensors 'x' and 'y'")
        x, y = obj["x"], obj["y"]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError(f"{path.name}: 'x' and 'y' must be tensors")
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise InputError(
            f"{path.name}: expected x of shape (N, ...) and y of shape (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise InputError(f"{path.name}: 'y' must hold integer class labels")
    y = y.long()
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{path.name}: 'x' contains NaN or infinite values")
    if x.shape[0] < 2:
        raise InputError(f"{path.name}: need at least 2 examples, got {x.shape[0]}")
    if int(y.min()) < 0:
        raise InputError(f"{path.name}: class labels must be >= 0")
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return Dataset(x.float(), y, classes, f"{path.name} ({x.shape[0]} examples {'x'.join(map(str, x.shape[1:]))})")


def _load_folder(path: Path) -> Dataset:
    import numpy as np
    from PIL import Image

    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{path} has no class subfolders (expected {path}/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(class_dirs):
        files += [(f, label) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(files) < 2:
        raise InputError(f"{path} holds fewer than 2 images in its class subfolders")
    first = Image.open(files[0][0])
    mode = "L" if first.mode in ("L", "1", "I", "I;16") else "RGB"
    size = first.size
    arrays = []
    for file, _ in files:
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                if image.size != size:
                    image = image.resize(size)
                arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        except Exception as error:
            raise InputError(f"cannot read image {file}: {describe(error)}") from None
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2)
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    shape = "x".join(map(str, x.shape[1:]))
    return Dataset(x.contiguous(), y, [d.name for d in class_dirs], f"{path} ({len(files)} images {shape})")


def load_dataset(data: str | Path) -> Dataset:
    """'digits', a folder of class subfolders, or a .pt/.npz file with x and y; one clear error otherwise."""
    if str(data) == "digits":
        return load_digits()
    path = Path(data)
    if not path.exists():
        raise InputError(f"no such data: {path} (use 'digits', a folder of class subfolders, or a .pt/.npz file)")
    if path.is_dir():
        return _load_folder(path)
    if path.suffix in (".pt", ".pth", ".npz"):
        return _load_tensor_file(path)
    raise InputError(f"unknown data format '{path.suffix}': expected a folder, .pt or .npz")


def split_dataset(dataset: Dataset, seed: int, held_out: float = 0.2) -> Split:
    """A seeded random split; at least one example on each side."""
    count = dataset.x.shape[0]
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val = min(max(1, round(held_out * count)), count - 1)
    val_idx, train_idx = order[:val], order[val:]
    return Split(
        dataset.x[train_idx],
        dataset.y[train_idx],
        dataset.x[val_idx],
        dataset.y[val_idx],
        dataset.classes,
        dataset.description,
    )
