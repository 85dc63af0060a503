"""The measured input gradient (analysis/gradient.py) against the exact Jacobian norm, computed here
independently: the dense Jacobian in float64 (torch.autograd.functional.jacobian) and its SVD.

The claim to test is the one the report prints: a lower estimate, at any number of steps, of
||dy/dx||_2 at the example input, and the exact value once the Krylov space holds the top
singular vector.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wssi_audit.analysis.gradient import measured_log10_gradient
from wssi_audit.frontends import build_graph


def _network(seed: int, width: int, depth: int, conv: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    if conv:
        layers += [torch.nn.Conv2d(2, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
        layers += [torch.nn.Conv2d(width, width, 3, stride=2), torch.nn.Tanh(), torch.nn.Flatten()]
        features, x = width * 2 * 2, torch.randn(1, 2, 6, 6)
    else:
        features, x = 7, torch.randn(1, 7)
    for _ in range(depth):
        layers += [torch.nn.Linear(features, width), torch.nn.GELU()]
        features = width
    layers.append(torch.nn.Linear(features, 5))
    model = torch.nn.Sequential(*layers).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.2, 3.0)
    return model, x


def _exact_log10(model: torch.nn.Module, x: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(lambda v: model.double()(v), x.double())
    model.float()
    return math.log10(float(torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()), ord=2)))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(2, 12),
    depth=st.integers(0, 3),
    conv=st.booleans(),
    steps=st.integers(1, 6),
)
def test_measured_gradient_never_exceeds_the_exact_jacobian_norm(
    seed: int, width: int, depth: int, conv: bool, steps: int
) -> None:
    model, x = _network(seed, width, depth, conv)
    exact = _exact_log10(model, x)
    measured, note, method = measured_log10_gradient(build_graph(model, (x,)).runner, steps=steps)
    assert measured is not None, note
    assert measured <= exact + 1e-5  # float32 passes: a lower estimate up to their rounding
    assert "lower estimate" in method


@pytest.mark.parametrize("conv", [False, True])
def test_measured_gradient_reaches_the_exact_norm_when_the_krylov_space_is_full(conv: bool) -> None:
    """Five outputs: after at most five steps the Krylov space holds every right singular vector
    the Jacobian has, so the estimate is the exact norm (not just below it)."""
    model, x = _network(3, 8, 2, conv)
    exact = _exact_log10(model, x)
    measured, _, method = measured_log10_gradient(build_graph(model, (x,)).runner, steps=8)
    assert measured is not None
    assert abs(measured - exact) < 1e-5
    steps = int(method.split("float32, ")[1].split(" steps")[0])
    assert steps <= 5  # stopped when the space was exhausted, and says how many steps ran


def test_three_steps_beat_three_power_iteration_steps() -> None:
    """The reason for Lanczos: on a Jacobian with a slowly decaying spectrum its estimate after
    k steps is at least the power iteration's (same start vector, same products), here computed
    independently with the dense Jacobian."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 40), torch.nn.Tanh(), torch.nn.Linear(40, 30)).eval()
    x = torch.randn(1, 40)
    jacobian = torch.autograd.functional.jacobian(model, x).reshape(30, 40).double()
    measured, _, _ = measured_log10_gradient(build_graph(model, (x,)).runner, steps=3)
    u = torch.randn(30, generator=torch.Generator().manual_seed(0)).double()
    best = 0.0
    for _ in range(3):  # the power iteration the estimate replaced: 3 backward and 3 forward passes
        w = jacobian.T @ (u / u.norm())
        best = max(best, float(w.norm()))
        u = jacobian @ (w / w.norm())
        best = max(best, float(u.norm()))
    assert measured is not None and measured >= math.log10(best) - 1e-6
