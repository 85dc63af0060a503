"""The embedded default: a small ReLU network trained for a few seconds on scikit-learn's
bundled digits data, saved as a torch.export archive, ready to audit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cli_support import save_atomic
from .models import create_model


@dataclass
class DemoResult:
    path: Path
    test_accuracy: float
    seconds: float


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (1, 8, 8) images in [0, 1]: (train x, train y, test x, test y) of the bundled digits'
    one fixed split (`training.data.digits_split`), the split `finetune --data digits` holds out from."""
    from .training.data import digits_split, load_digits

    digits = load_digits()
    train, test = digits_split()
    return digits.x[train], digits.y[train], digits.x[test], digits.y[test]


def train_demo_model(arch: str = "cnn", epochs: int = 15, seed: int = 0) -> tuple[nn.Module, float, torch.Tensor]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_tensors()  # the seed sets the init and order, not the split
    model = create_model(arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return model, accuracy, x_test[:4]


def build_demo(output_dir: str | Path = "demo_out", arch: str = "cnn", epochs: int = 15, seed: int = 0) -> DemoResult:
    start = time.perf_counter()
    model, accuracy, example = train_demo_model(arch, epochs, seed)
    program = torch.export.export(model, (example,), strict=False)
    path = Path(output_dir) / f"digits_{arch}.pt2"
    save_atomic(path, lambda tmp: torch.export.save(program, tmp))
    return DemoResult(path, accuracy, time.perf_counter() - start)
