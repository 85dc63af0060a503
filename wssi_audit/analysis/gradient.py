"""The measured input gradient: ||dy/dx||_2 at the example inputs, a lower estimate of the Lipschitz
constant that the two bounds of `metrics` must never fall below.

Power iteration on the Jacobian J of all float outputs with respect to all float inputs, at the
example batch, or at each batch of given data points in its place (in eval mode examples do not
interact, so J is block diagonal and its norm is the largest per-example one): alternately
w = J^T u (one backward pass) and u = J w (one forward-mode pass). Every iterate's ratio
||J^T u|| / ||u|| and ||J w|| / ||w|| is at most ||J||, so the value reported, the largest seen,
is a lower estimate however few steps are run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError, describe
from ..ir import Runner, flat_tensors

METHOD = "power iteration on the Jacobian at {where} (float32, {steps} steps): a lower estimate"


def _flat(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0)


def measured_log10_gradient(
    runner: Runner | None, steps: int = 6, seed: int = 0, points: torch.Tensor | None = None
) -> tuple[float | None, str, str]:
    """(log10 of the largest ||J v|| / ||v|| seen, note, method). `points`: a batch of examples
    (N, ...) measured in place of the first floating-point example input, in chunks of its batch
    size; the largest figure over all of them is reported (each is a lower estimate)."""
    if runner is None:
        return None, "no example input", ""
    handle = runner.differentiable()
    if handle is None:
        return None, "not measured: this runtime has no autograd (onnxruntime)", ""
    function, inputs = handle
    positions = [i for i, x in enumerate(inputs) if torch.is_tensor(x) and x.is_floating_point()]
    if not positions:
        return None, "not measured: the model has no floating-point input", ""
    primals = [tuple(inputs[i].detach() for i in positions)]
    where = "the example inputs"
    if points is not None:
        primals = [(chunk, *primals[0][1:]) for chunk in _chunks(points, primals[0][0])]
        where = f"{len(primals) * primals[0][0].shape[0]} data examples"

    def outputs_of(*xs: torch.Tensor) -> torch.Tensor:
        args = list(inputs)
        for i, x in zip(positions, xs):
            args[i] = x
        return _flat([t for t in flat_tensors(function(*args)) if t.is_floating_point()])

    best = 0.0
    for primal in primals:
        value, note = _power_iteration(outputs_of, primal, steps, seed)
        if value is None:
            return None, note, ""
        best = max(best, value)
    return (math.log10(best) if best > 0 else float("-inf")), "", METHOD.format(where=where, steps=steps)


def _chunks(points: torch.Tensor, example: torch.Tensor) -> list[torch.Tensor]:
    """The data points in batches shaped like the example input (a short tail is dropped)."""
    size = int(example.shape[0]) if example.dim() else 1
    if tuple(points.shape[1:]) != tuple(example.shape[1:]):
        raise InputError(
            f"data examples of shape {tuple(points.shape[1:])} do not fit the model's input "
            f"{tuple(example.shape)} (batch dimension first)"
        )
    if points.shape[0] < size:
        raise InputError(f"{points.shape[0]} data examples are fewer than the input's batch size {size}")
    count = points.shape[0] // size
    return [points[i * size : (i + 1) * size].to(example.dtype) for i in range(count)]


def _power_iteration(
    outputs_of: Callable[..., torch.Tensor], primal: tuple[torch.Tensor, ...], steps: int, seed: int
) -> tuple[float | None, str]:
    generator = torch.Generator().manual_seed(seed)
    best = 0.0
    try:
        with torch.enable_grad():
            output, pullback = torch.func.vjp(outputs_of, *primal)
            u = torch.randn(output.shape, generator=generator, dtype=output.dtype)
            for step in range(steps):
                u = u / u.norm().clamp_min(1e-30)
                w = pullback(u)
                norm = math.sqrt(sum(float(x.detach().double().square().sum()) for x in w))
                if not math.isfinite(norm):
                    return None, "not measured: the gradient is not finite"
                best = max(best, norm)
                if norm == 0.0 or step == steps - 1:
                    break
                w = tuple(x / norm for x in w)
                _, u = torch.func.jvp(outputs_of, primal, w)
                image = float(u.detach().norm())
                if not math.isfinite(image):
                    return None, "not measured: the gradient is not finite"
                best = max(best, image)
    except Exception as error:
        return None, f"not measured: {describe(error)}"
    return best, ""
