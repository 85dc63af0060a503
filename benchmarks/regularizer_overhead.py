"""Overhead of `wssi_audit.attach` on a training step: a torchvision ResNet (default ResNet-18 on
CIFAR-sized batches, 128 x 3 x 32 x 32), SGD with plain weight decay vs SGD + the invariant regularizer.

The two arms alternate step by step in one process (same load, same thermal state), and the median
per-step time ratio is printed. Usage: ``python benchmarks/regularizer_overhead.py [--steps 20]``;
the GPU goal (median ratio <= 1.01): ``--device cuda --model resnet50 --batch-size 256
--image-size 224 --amp bf16``. ``--json FILE`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
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
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast (fp16: GradScaler)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import torchvision

    import wssi_audit

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    base = getattr(torchvision.models, args.model)(num_classes=args.classes)
    plain = base.to(device, memory_format=memory_format)
    regularized = copy.deepcopy(base).to(device, memory_format=memory_format)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scalers = {}

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

    def autocast() -> contextlib.AbstractContextManager[None]:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """One training step; also records the time of optimizer.step() (where the hook runs)."""
        scaler = scalers.setdefault(id(optimizer), torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))
        sync()
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        sync()
        middle = time.perf_counter()
        scaler.step(optimizer)
        scaler.update()
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

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"machine: {_cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, device {device}"
        + (f" ({card})" if card else "")
    )
    shape = f"{args.batch_size}x3x{args.image_size}x{args.image_size}"
    print(
        f"model: torchvision {args.model}(num_classes={args.classes}), batch {shape}, SGD momentum 0.9, "
        f"amp {args.amp}{', channels_last' if args.channels_last else ''}"
    )
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
    if args.json:
        figures = {
            "device": str(device),
            "card": card,
            "torch": torch.__version__,
            "model": args.model,
            "batch": shape,
            "amp": args.amp,
            "steps": args.steps,
            "median_step_ms": {"weight_decay": statistics.median(times_plain) * 1e3},
            "median_hook_ms": statistics.median(hook) * 1e3,
            "median_pair_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(times_reg) / statistics.median(times_plain),
            "estimate": estimate,
        }
        figures["median_step_ms"]["attach"] = statistics.median(times_reg) * 1e3
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
