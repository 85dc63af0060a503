"""Data for fine-tuning: the bundled digits, a folder of images in class subfolders, or a .pt/.npz file.

* digits (scikit-learn's 1797 8x8 images, no download) have ONE fixed split, `digits_split`, shared
  with `wssi-audit demo`: the demo trains on its first part, `finetune --data digits` holds out the
  second, so fine-tuning the demo's model never evaluates on examples the demo trained on.
* an image folder is listed, not loaded: images are decoded per example (in DataLoader workers), so
  the data set need not fit in memory. All images take the mode (grey or RGB) and size of the first.
* .pt / .npz files hold tensors x (N, ...) and y (N,) and are loaded into memory.

Folders and files are split into a training part and a held-out part by a permutation seeded with
the run's seed, so a run is repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, describe
from ..ir import all_finite

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
DEFAULT_HELD_OUT = 0.2
# The bundled digits' one split (demo and finetune): a permutation seeded with this, 20 % held out.
DIGITS_SPLIT_SEED = 0
DIGITS_HELD_OUT = 0.2


@dataclass
class Dataset:
    """A data set held in memory."""

    x: torch.Tensor  # float32, (N, ...)
    y: torch.Tensor  # int64, (N,)
    classes: list[str]
    description: str


class TensorExamples(torch.utils.data.Dataset):
    """In-memory examples; `__getitems__` serves a whole batch with one indexing (no per-example collation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]

    @staticmethod
    def collate(batch: Any) -> Any:
        return batch  # __getitems__ already built the batch


class ImageFolderExamples(torch.utils.data.Dataset):
    """Image files decoded on access (in the DataLoader's workers), as float32 (C, H, W) in [0, 1]."""

    def __init__(self, files: list[tuple[Path, int]], mode: str, size: tuple[int, int]) -> None:
        self.files, self.mode, self.size = files, mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        from PIL import Image

        file, label = self.files[index]
        try:
            with Image.open(file) as image:
                image = image.convert(self.mode)
                if image.size != self.size:
                    image = image.resize(self.size)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except Exception as error:
            raise InputError(f"cannot read image {file}: {describe(error)}") from None
        x = torch.from_numpy(array.copy())
        x = x.unsqueeze(0) if self.mode == "L" else x.permute(2, 0, 1).contiguous()
        return x, torch.tensor(label, dtype=torch.long)

    collate = staticmethod(torch.utils.data.default_collate)


@dataclass
class Data:
    """Training and held-out examples, ready for a DataLoader (each dataset has a `collate`)."""

    train: TensorExamples | ImageFolderExamples
    held_out: TensorExamples | ImageFolderExamples
    classes: list[str]
    description: str
    sample_shape: tuple[int, ...]
    labels: int  # largest label + 1
    streamed: bool  # decoded per example: worth DataLoader workers

    def sample(self) -> torch.Tensor:
        """The first training example with a batch dimension."""
        return self.train[0][0].unsqueeze(0)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return Dataset(x, y, [str(c) for c in range(10)], "digits (scikit-learn, 1797 images 1x8x8)")


def split_indices(count: int, seed: int, held_out: float = DEFAULT_HELD_OUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices): a seeded permutation, the first part for training; at
    least one example on each side."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = min(max(1, int((1 - held_out) * count)), count - 1)
    return order[:cut], order[cut:]


def digits_split() -> tuple[torch.Tensor, torch.Tensor]:
    """THE split of the bundled digits (training, held-out indices): `wssi-audit demo` trains on the
    first, `finetune --data digits` evaluates on the second, whatever the run's seed."""
    return split_indices(len(load_digits().y), DIGITS_SPLIT_SEED, DIGITS_HELD_OUT)


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
    if x.is_floating_point() and not all_finite(x):
        raise InputError(f"{path.name}: 'x' contains NaN or infinite values")
    if x.shape[0] < 2:
        raise InputError(f"{path.name}: need at least 2 examples, got {x.shape[0]}")
    if int(y.min()) < 0:
        raise InputError(f"{path.name}: class labels must be >= 0")
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return Dataset(x.float(), y, classes, f"{path.name} ({x.shape[0]} examples {'x'.join(map(str, x.shape[1:]))})")


def _in_memory(dataset: Dataset, train: torch.Tensor, held_out: torch.Tensor) -> Data:
    return Data(
        TensorExamples(dataset.x[train], dataset.y[train]),
        TensorExamples(dataset.x[held_out], dataset.y[held_out]),
        dataset.classes,
        dataset.description,
        tuple(dataset.x.shape[1:]),
        int(dataset.y.max()) + 1,
        streamed=False,
    )


def _image_folder(path: Path, seed: int, held_out: float) -> Data:
    from PIL import Image

    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{path} has no class subfolders (expected {path}/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(class_dirs):
        files += [(f, label) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(files) < 2:
        raise InputError(f"{path} holds fewer than 2 images in its class subfolders")
    try:
        with Image.open(files[0][0]) as first:
            mode = "L" if first.mode in ("L", "1", "I", "I;16") else "RGB"
            size = first.size
    except Exception as error:
        raise InputError(f"cannot read image {files[0][0]}: {describe(error)}") from None
    train, held = split_indices(len(files), seed, held_out)
    channels = 1 if mode == "L" else 3
    shape = (channels, size[1], size[0])
    return Data(
        ImageFolderExamples([files[i] for i in train.tolist()], mode, size),
        ImageFolderExamples([files[i] for i in held.tolist()], mode, size),
        [d.name for d in class_dirs],
        f"{path} ({len(files)} images {'x'.join(map(str, shape))}, streamed)",
        shape,
        len(class_dirs),
        streamed=True,
    )


def load_data(data: str | Path, seed: int = 0, held_out: float | None = None) -> Data:
    """'digits' (its fixed split), a folder of class subfolders, or a .pt/.npz file with x and y (split
    with `seed`, `held_out` of it held out, default 20 %); one clear error otherwise."""
    if str(data) == "digits":
        if held_out is not None and held_out != DIGITS_HELD_OUT:
            raise InputError(
                f"the bundled digits have one fixed split, shared with `wssi-audit demo` "
                f"({DIGITS_HELD_OUT:.0%} held out): a held-out fraction does not apply"
            )
        return _in_memory(load_digits(), *digits_split())
    fraction = DEFAULT_HELD_OUT if held_out is None else held_out
    path = Path(data)
    if not path.exists():
        raise InputError(f"no such data: {path} (use 'digits', a folder of class subfolders, or a .pt/.npz file)")
    if path.is_dir():
        return _image_folder(path, seed, fraction)
    if path.suffix in (".pt", ".pth", ".npz"):
        dataset = _load_tensor_file(path)
        return _in_memory(dataset, *split_indices(len(dataset.y), seed, fraction))
    raise InputError(f"unknown data format '{path.suffix}': expected a folder, .pt or .npz")
