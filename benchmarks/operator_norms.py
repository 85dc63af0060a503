"""Time and tightness of the certified per-layer operator-norm bounds on real architectures.

    .venv/bin/python benchmarks/operator_norms.py [--models resnet18@32 resnet50@224 vgg11@224]
        [--budget 1e10] [--repeat 3] [--threads 2] [--measure]

For each torchvision model (random weights, BatchNorm statistics and affine parameters drawn at
random, eval mode): the layers' input sizes from one forward pass, the folded weights from the
audit's structure, then `operator_norms` over all weight layers with one shared --budget of
float64 operations (conv_plans.allocate), timed (best of --repeat, wall and process CPU; the
bounds run on one torch thread whatever --threads says). Printed: seconds per model, the plans
used, and the residual-aware log10 input-gradient bound propagated as the audit does, with
Frobenius norms x overlap factors (today's figure) and with the certified upper bounds; with
--measure also the measured log10 ||d logits / d x||_2 at a few random inputs in [0, 1] (power
iteration on the Jacobian).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import time

import torch
import torchvision

from wssi_audit.analysis.metrics import layer_norms, log10_input_gradient_bound
from wssi_audit.analysis.operator_norms import DEFAULT_MODEL_BUDGET, LayerSpec, operator_norms
from wssi_audit.analysis.weights import effective_weight
from wssi_audit.auditing import analyze
from wssi_audit.models import randomize_batch_norm


def build(name: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    extra = {"num_classes": 10} if size <= 64 else {}
    model = randomize_batch_norm(getattr(torchvision.models, name)(weights=None, **extra))
    return model, torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def layer_specs(model: torch.nn.Module, x: torch.Tensor):
    analysis = analyze(model, (x,), verify=False)
    modules = dict(model.named_modules())
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, inputs, output):
            sizes.setdefault(name, tuple(inputs[0].shape[2:]))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    specs = []
    for layer in analysis.structure.layers:
        weight, _ = effective_weight(layer, analysis.graph.tensors)
        module = modules[layer.name]
        if isinstance(module, torch.nn.Conv2d):
            specs.append(
                LayerSpec(weight, sizes[layer.name], module.stride, module.padding, module.dilation, module.groups)
            )
        else:
            specs.append(LayerSpec(weight))
    return analysis, specs


def measured_gradient(model: torch.nn.Module, size: int, seeds: int = 3, steps: int = 30) -> float:
    """max over random inputs of ||d logits / d x||_2, by power iteration with jvp/vjp."""
    model = model.double()
    best = 0.0
    for seed in range(seeds):
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        vector = torch.randn_like(x)
        sigma = 0.0
        for _ in range(steps):
            vector = vector / vector.norm()
            _, pullback = torch.func.vjp(model, x)
            _, image = torch.func.jvp(model, (x,), (vector,))
            sigma = float(image.norm())
            (vector,) = pullback(image)
        best = max(best, sigma)
    model.float()
    return math.log10(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18@32", "resnet50@224", "vgg11@224"])
    parser.add_argument("--budget", type=float, default=DEFAULT_MODEL_BUDGET, help="float64 operations per model")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--measure", action="store_true", help="also measure the input gradient (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, budget {args.budget:.3g} operations per model")
    for entry in args.models:
        name, size = entry.split("@")
        model, x = build(name, int(size))
        analysis, specs = layer_specs(model, x)
        wall, cpu = math.inf, math.inf
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            bounds = operator_norms(specs, budget=args.budget)
            wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
        base = layer_norms(analysis.structure.layers, analysis.graph.tensors)
        certified = {
            layer.name: dataclasses.replace(
                base[layer.name], log10_frobenius=math.log10(b.upper), log10_operator_factor=0.0
            )
            for layer, b in zip(analysis.structure.layers, bounds)
        }
        today, _ = log10_input_gradient_bound(analysis.graph, analysis.structure, base)
        bound, _ = log10_input_gradient_bound(analysis.graph, analysis.structure, certified)
        gaps = [b.upper / b.lower for b in bounds if b.lower > 0]
        methods = collections.Counter(b.method for b in bounds)
        print(f"\n{entry}: {len(specs)} weight layers, {wall:.2f} s wall, {cpu:.2f} s CPU (best of {args.repeat})")
        print(f"  log10 input-gradient bound: Frobenius x overlap {today:.2f}, certified operator norms {bound:.2f}")
        print(f"  per-layer upper/lower: median {sorted(gaps)[len(gaps) // 2]:.3f}, max {max(gaps):.3f}")
        for method, count in methods.most_common():
            print(f"  {count:3d} x {method}")
        if args.measure:
            print(f"  measured log10 ||d logits/dx||_2 (max of 3 inputs): {measured_gradient(model, int(size)):.2f}")


if __name__ == "__main__":
    main()
