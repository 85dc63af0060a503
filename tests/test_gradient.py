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
from hypothesis import example, given, settings
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
# a late step's J w at 4e-6 of ||J||: its float32 rounding is at ||J||'s scale, not its own
@example(seed=5437, width=12, depth=3, conv=False, steps=6)
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


class _Scale(torch.autograd.Function):
    """y = 3 x with a backward that cannot be differentiated again (as some ops' backward cannot)
    and a forward-mode rule `tangent_factor` times the true one."""

    tangent_factor = 1.0

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 3 * x

    @staticmethod
    def setup_context(ctx: object, inputs: object, output: object) -> None:
        pass

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return 3 * grad

    @staticmethod
    def jvp(ctx: object, tangent: torch.Tensor) -> torch.Tensor:
        return 3 * _Scale.tangent_factor * tangent


def _scaled_network(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.tanh(_Scale.apply(x) @ weight).reshape(-1)


def test_an_op_without_double_backward_is_measured_in_forward_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The double-backward product raises on the once-differentiable op; the step falls back to
    forward mode and the figure is still the exact norm (dense Jacobian, computed here)."""
    from wssi_audit.analysis.gradient import _bidiagonalization

    monkeypatch.setattr(_Scale, "tangent_factor", 1.0)
    torch.manual_seed(1)
    x, weight = torch.randn(1, 6), torch.randn(6, 3)
    jacobian = torch.autograd.functional.jacobian(lambda v: torch.tanh(3 * v @ weight).reshape(-1), x)
    exact = float(torch.linalg.matrix_norm(jacobian.reshape(3, 6).double(), ord=2))
    value, note, steps = _bidiagonalization(lambda v: _scaled_network(v, weight), (x,), steps=6, seed=0)
    assert value is not None, note
    assert abs(value - exact) < 1e-5 * exact and steps <= 3


def test_a_forward_product_that_is_not_the_backwards_transpose_is_not_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control of the adjoint check: a forward-mode rule twice the truth (so J w is not the
    transpose of what the backward applies) gives no figure, where it would give a wrong one."""
    from wssi_audit.analysis.gradient import _bidiagonalization

    monkeypatch.setattr(_Scale, "tangent_factor", 2.0)
    torch.manual_seed(1)
    x, weight = torch.randn(1, 6), torch.randn(6, 3)
    value, note, _ = _bidiagonalization(lambda v: _scaled_network(v, weight), (x,), steps=6, seed=0)
    assert value is None and "disagree" in note


def test_an_output_that_does_not_depend_on_the_input_measures_zero() -> None:
    from wssi_audit.analysis.gradient import _bidiagonalization

    value, note, _ = _bidiagonalization(lambda v: torch.ones(4), (torch.randn(1, 3),), steps=3, seed=0)
    assert value == 0.0 and note == ""


def test_convolutions_pools_and_batchnorm_take_the_double_backward_path() -> None:
    """The cheap product is the one that runs on ordinary layers: no fall back to forward mode."""
    from wssi_audit.analysis.gradient import _Products

    model, x = _network(5, 6, 1, conv=True)
    model = torch.nn.Sequential(torch.nn.MaxPool2d(1), *model).eval()
    products = _Products(lambda v: model(v).reshape(-1), (x,))
    direction = (torch.randn_like(x),)
    image = products.push(direction)
    assert not products.forward_mode
    assert torch.allclose(image, torch.func.jvp(lambda v: model(v).reshape(-1), (x,), direction)[1], atol=1e-5)


@pytest.mark.parametrize("fill, note", [(math.nan, "input holds NaN or Inf"), (math.inf, "input holds NaN or Inf"),
                                        (1e38, "outputs at the input are not finite")])  # fmt: skip
def test_a_non_finite_point_is_not_measured(fill: float, note: str) -> None:
    """At a NaN input ReLU's backward masks every unit off and autograd still returns numbers: a
    'gradient' of no point of the model (the sweep saw -1.13 reported at a NaN sample input). An
    input of 1e38 overflows float32 in the first layer. Control: the same network at a finite
    input is measured."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(10.0)
    x = torch.rand(1, 4)
    value, _, _ = measured_log10_gradient(build_graph(model, (x,)).runner)
    assert value is not None and math.isfinite(value)
    value, found, _ = measured_log10_gradient(build_graph(model, (torch.full_like(x, fill),)).runner)
    assert value is None and note in found


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), conv=st.booleans())
def test_the_scalar_product_pullback_is_autograds_to_the_bit(seed, conv):
    """_vjp takes J^T u as the gradient of <y, u> (no grad_outputs: their shape check imports sympy);
    the reference is autograd with grad_outputs, and the numbers must be the same bits."""
    from wssi_audit.analysis.gradient import _vjp

    model, x = _network(seed, 6, 3, conv)
    x = x.detach().requires_grad_()
    y = model(x)
    u = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (expected,) = torch.autograd.grad(y, x, u, retain_graph=True)
    (got,) = _vjp([y], (x,), [u], retain_graph=True)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="seeds of"):
        _vjp([y], (x,), [u[..., :1]])
