"""Audit the real architectures of docs/architectures.md and print their table row by row.

    .venv/bin/python benchmarks/architectures_table.py [--input-size 64] [--randomize-bn]

Random init (weights=None / pretrained=False), eval mode, one 1x3xSxS input (LeViT at its fixed
224: NATIVE_SIZE). A model that fails prints one row saying why, and the table goes on. With
--randomize-bn, BatchNorm statistics and affine parameters are drawn at random as in
tests/test_real_architectures.py (at init they are 0/1, so folding is trivially exact).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from wssi_audit import audit
from wssi_audit.models import randomize_batch_norm

MODELS: list[tuple[str, str]] = [
    ("torchvision", "resnet18"),
    ("torchvision", "resnet50"),
    ("torchvision", "vgg11"),
    ("torchvision", "mobilenet_v2"),
    ("torchvision", "densenet121"),
    ("timm", "resnet18"),
    ("timm", "resnet50"),
    ("timm", "res2net50_14w_8s"),
    ("timm", "repvgg_a0"),
    ("timm", "levit_128s"),
    ("timm", "tresnet_m"),
]
# Models whose attention biases fix the input resolution run at their native size instead.
NATIVE_SIZE = {"levit_128s": 224}


def factory(library: str, name: str) -> Callable[[], nn.Module]:
    if library == "torchvision":
        import torchvision

        return lambda: getattr(torchvision.models, name)(weights=None)
    import timm

    return lambda: timm.create_model(name, pretrained=False)


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--randomize-bn", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        "| model | input | trace | ops | coverage | chains | residual blocks (id+proj) | folded BN | barriers "
        "| homogeneous weight | max imbalance (dec) | log10 gradient: Frobenius / certified / measured "
        "| verification | audit time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for library, name in MODELS:
        torch.manual_seed(0)
        model = factory(library, name)().eval()
        if args.randomize_bn:
            randomize_batch_norm(model)
        size = NATIVE_SIZE.get(name, args.input_size)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        try:
            audit(model, (x,), verify=False, measure=False)  # warm-up
            start = time.perf_counter()
            report = audit(model, (x,))
            seconds = time.perf_counter() - start
        except Exception as error:  # one row, and the next model
            print(f"| {library} {name} | {size} | failed: {type(error).__name__}: {str(error)[:120]} |", flush=True)
            continue
        s = report.summary
        g = s.gradient
        tally = ", ".join(f"{n} {status}" for status, n in sorted(s.verification.items()))
        identity = sum(b.shortcut == "identity" for b in report.residual_blocks)
        barriers: dict[str, int] = {}
        for barrier in report.barriers:
            barriers[barrier.op] = barriers.get(barrier.op, 0) + 1
        print(
            f"| {library} {name} | {size} | {report.trace.method} | {report.trace.nodes} | {report.trace.coverage:.0%} "
            f"| {s.chains} | {s.residual_blocks} ({identity}+{s.residual_blocks - identity}) "
            f"| {sum(layer.folded_bn is not None for layer in report.layers)} "
            f"| {', '.join(f'{op} x{n}' for op, n in barriers.items()) or 'none'} "
            f"| {s.homogeneous_weight_fraction:.1%} | {fmt(s.max_imbalance_decades)} "
            f"| {fmt(g.log10_frobenius_bound, 1)} / {fmt(g.log10_certified_bound, 1)} / {fmt(g.log10_measured, 1)} "
            f"| {tally} | {seconds:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
