"""Shared by the example scripts: build a registered model, give it realistic statistics,
export it with torch.export and save it as .pt2."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from wssi_audit.models import INPUT_SHAPES, create_model


def build_and_save(name: str, path: str | Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = create_model(name)
    shape = INPUT_SHAPES[name]
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        # A few training-mode passes give BatchNorm non-trivial running statistics to fold.
        model.train()
        with torch.no_grad():
            for _ in range(5):
                model(torch.rand(16, *shape[1:]) * 2 + 0.5)
    model.eval()
    example = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    program = torch.export.export(model, (example,), strict=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


def main(name: str) -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else f"{name}.pt2"
    print(build_and_save(name, target))
