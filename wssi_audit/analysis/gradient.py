"""The measured input gradient: ||dy/dx||_2 at the example inputs, a lower estimate of the Lipschitz
constant that the two bounds of `metrics` must never fall below.

Power iteration on the Jacobian J of all float outputs with respect to all float inputs, at the
example batch (in eval mode examples do not interact, so J is block diagonal and its norm is the
largest per-example one): alternately w = J^T u (one backward pass) and u = J w (one forward-mode
pass). Every iterate's ratio ||J^T u|| / ||u|| and ||J w|| / ||w|| is at most ||J||, so the value
reported, the largest seen, is a lower estimate however few steps are run.
"""

from __future__ import annotations

import math

import torch

from ..errors import describe
from ..ir import Runner, flat_tensors

METHOD = "power iteration on the Jacobian at the example inputs (float32, {steps} steps): a lower estimate"


def _flat(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0)


def measured_log10_gradient(runner: Runner | None, steps: int = 6, seed: int = 0) -> tuple[float | None, str, str]:
    """(log10 of the largest ||J v|| / ||v|| seen, note, method)."""
    if runner is None:
        return None, "no example input", ""
    handle = runner.differentiable()
    if handle is None:
        return None, "not measured: this runtime has no autograd (onnxruntime)", ""
    function, inputs = handle
    positions = [i for i, x in enumerate(inputs) if torch.is_tensor(x) and x.is_floating_point()]
    if not positions:
        return None, "not measured: the model has no floating-point input", ""

    def outputs_of(*xs: torch.Tensor) -> torch.Tensor:
        args = list(inputs)
        for i, x in zip(positions, xs):
            args[i] = x
        return _flat([t for t in flat_tensors(function(*args)) if t.is_floating_point()])

    primal = tuple(inputs[i].detach() for i in positions)
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            output, pullback = torch.func.vjp(outputs_of, *primal)
            u = torch.randn(output.shape, generator=generator, dtype=output.dtype)
            best = 0.0
            for step in range(steps):
                u = u / u.norm().clamp_min(1e-30)
                w = pullback(u)
                norm = math.sqrt(sum(float(x.detach().double().square().sum()) for x in w))
                if not math.isfinite(norm):
                    return None, "not measured: the gradient is not finite", ""
                best = max(best, norm)
                if norm == 0.0 or step == steps - 1:
                    break
                w = tuple(x / norm for x in w)
                _, u = torch.func.jvp(outputs_of, primal, w)
                image = float(u.detach().norm())
                if not math.isfinite(image):
                    return None, "not measured: the gradient is not finite", ""
                best = max(best, image)
    except Exception as error:
        return None, f"not measured: {describe(error)}", ""
    value = math.log10(best) if best > 0 else float("-inf")
    return value, "", METHOD.format(steps=steps)
