"""Overhead of `wssi_audit.attach` on a training step: ResNet-18 (torchvision, 10 classes), CIFAR-sized
batches (128 x 3 x 32 x 32), SGD with plain weight decay vs SGD + the invariant regularizer.

The two arms alternate step by step in one process (same load, same thermal state), and the median
per-step time ratio is printed. Usage: ``python benchmarks/regularizer_overhead.py [--steps 20]``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--form", default="log")
    args = parser.parse_args()

    import torchvision

    import wssi_audit

    torch.manual_seed(0)
    device = torch.device(args.device)
    base = torchvision.models.resnet18(num_classes=10)
    plain, regularized = base.to(device), copy.deepcopy(base).to(device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_reg = torch.optim.SGD(regularized.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    started = time.perf_counter()
    handle = wssi_audit.attach(regularized, opt_reg, strength=1e-3, form=args.form, example_inputs=x[:2])
    setup = time.perf_counter() - started
    coverage = handle.coverage()

    optimizer_times: dict[int, list[float]] = {id(opt_plain): [], id(opt_reg): []}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """One training step; also records the time of optimizer.step() (where the hook runs)."""
        sync()
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        sync()
        middle = time.perf_counter()
        optimizer.step()
        sync()
        end = time.perf_counter()
        optimizer_times[id(optimizer)].append(end - middle)
        return end - begin

    # Time the hook alone too: what attach adds to each step.
    def hook_only() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        handle.regularizer.add_gradients_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    plain.train()
    regularized.train()
    for _ in range(args.warmup):
        step(plain, opt_plain)
        step(regularized, opt_reg)
    for times in optimizer_times.values():
        times.clear()
    times_plain, times_reg, ratios = [], [], []
    for index in range(args.steps):
        # Alternate which arm goes first, so neither always follows the other.
        if index % 2 == 0:
            a = step(plain, opt_plain)
            b = step(regularized, opt_reg)
        else:
            b = step(regularized, opt_reg)
            a = step(plain, opt_plain)
        times_plain.append(a)
        times_reg.append(b)
        ratios.append(b / a)
    hook = [hook_only() for _ in range(args.steps)]

    print(
        f"machine: {_cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, device {device}"
    )
    print(f"model: torchvision resnet18(num_classes=10), batch {args.batch_size}x3x32x32, SGD momentum 0.9")
    print(
        f"regularizer: form={args.form}, {len(coverage.covered)} layers covered, "
        f"{len(coverage.excluded)} weights excluded; attach() setup {setup:.2f} s"
    )
    print(f"median step, weight decay only : {statistics.median(times_plain) * 1e3:.1f} ms")
    print(f"median step, with attach       : {statistics.median(times_reg) * 1e3:.1f} ms")
    print(f"median hook time (add_gradients_): {statistics.median(hook) * 1e3:.2f} ms")
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"median per-pair step-time ratio: {statistics.median(ratios):.4f}  ({args.steps} alternating pairs; "
        f"quartiles {quartiles[0]:.3f} - {quartiles[2]:.3f})"
    )
    print(f"ratio of medians               : {statistics.median(times_reg) / statistics.median(times_plain):.4f}")
    step_plain = statistics.median(optimizer_times[id(opt_plain)])
    step_reg = statistics.median(optimizer_times[id(opt_reg)])
    print(f"median optimizer.step(): weight decay {step_plain * 1e3:.1f} ms, with attach {step_reg * 1e3:.1f} ms")
    estimate = 1 + (step_reg - step_plain) / statistics.median(times_plain)
    print(f"load-insensitive estimate 1 + (extra optimizer.step time) / (median step): {estimate:.4f}")


if __name__ == "__main__":
    main()
