"""The science, as properties: a weight scale shift leaves the function and every invariant
unchanged while weight decay's penalty moves; the input-gradient bound holds on every input."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import example_model
from wssi_audit import analyze, audit
from wssi_audit.analysis.verify import random_log10_factors
from wssi_audit.analysis.weights import shift_layers

MODELS = ["mlp", "cnn", "resnet_nobn", "resnet_bn"]
ANALYSES = {name: analyze(*example_model(name)) for name in MODELS}


def shifted_model(name: str, seed: int, decades: float) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    model, x = example_model(name)
    analysis = ANALYSES[name]
    rng = random.Random(seed)
    overrides = {}
    for chain in analysis.structure.chains:
        if len(chain.layers) > 1:
            factors = random_log10_factors(len(chain.layers), rng, decades)
            overrides.update(shift_layers(chain.layers, factors, analysis.graph.tensors))
    shifted = copy.deepcopy(model).double()
    state = shifted.state_dict()
    state.update(overrides)
    shifted.load_state_dict(state)
    return model.double(), shifted, x.double()


def weight_decay(model: torch.nn.Module) -> float:
    return sum(float(p.detach().double().square().sum()) for n, p in model.named_parameters() if n.endswith("weight"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(MODELS), seed=st.integers(0, 10_000), decades=st.floats(0.3, 2.0))
def test_scale_shift_preserves_outputs_and_invariants_but_not_weight_decay(name, seed, decades):
    original, shifted, x = shifted_model(name, seed, decades)
    with torch.no_grad():
        before, after = original(x), shifted(x)
    assert torch.allclose(before, after, rtol=1e-9, atol=1e-9 * float(before.abs().max()))

    report_before = audit(original.float(), (x.float(),), verify=False)
    report_after = audit(shifted.float(), (x.float(),), verify=False)
    for a, b in zip(report_before.chains, report_after.chains, strict=True):
        assert a.log10_intrinsic_norm == pytest.approx(b.log10_intrinsic_norm, abs=1e-5)
    for a, b in zip(report_before.residual_blocks, report_after.residual_blocks, strict=True):
        assert a.log10_branch_norm == pytest.approx(b.log10_branch_norm, abs=1e-5)
    # Weight decay's penalty is not a function of the network's function.
    assert abs(math.log10(weight_decay(shifted) / weight_decay(original))) > 1e-3


def jacobian_spectral_norm(model: torch.nn.Module, x: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), x)
    return float(torch.linalg.matrix_norm(jacobian.reshape(jacobian.shape[0], -1), ord=2))


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(MODELS), seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0))
def test_input_gradient_bound_holds_on_every_input(name, seed, scale):
    model, x = example_model(name)
    gradient = ANALYSES[name].report.summary.gradient
    generator = torch.Generator().manual_seed(seed)
    point = torch.randn(x.shape[1:], generator=generator, dtype=torch.float64) * scale
    norm = jacobian_spectral_norm(model.double(), point)
    assert norm <= 10**gradient.log10_frobenius_bound * (1 + 1e-9)
    assert norm <= 10**gradient.log10_certified_bound * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    size=st.integers(2, 6),
    kernel=st.sampled_from([1, 2, 3]),
    pad=st.integers(0, 2),
    stride=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_bounds_hold_for_every_padding_mode(mode, size, kernel, pad, stride, seed):
    """Reflect, replicate and circular padding repeat border inputs: both bounds must count it."""
    if mode in ("reflect", "circular") and pad >= size:
        pad = size - 1
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, kernel, stride=stride, padding=pad, padding_mode=mode),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 2, kernel, padding=pad, padding_mode=mode),
        torch.nn.Flatten(),
    ).double()
    x = torch.randn(1, 2, size, size, dtype=torch.float64)
    try:
        model(x)
    except RuntimeError:  # a padding torch refuses at this size
        return
    gradient = audit(model, (x,), verify=False, measure=False).summary.gradient
    # The model is linear where ReLU passes everything: with all-positive first outputs the
    # Jacobian is the linear map itself, so shift the first bias up to reach that region.
    with torch.no_grad():
        model[0].bias.add_(1e3)
    norm = jacobian_spectral_norm(model, x[0])
    assert norm <= 10**gradient.log10_frobenius_bound * (1 + 1e-9)
    assert norm <= 10**gradient.log10_certified_bound * (1 + 1e-9)


def test_bound_is_not_vacuous_for_a_single_linear_layer():
    """For one Linear layer the bound is ||W||_F, close to the true ||W||_2."""
    layer = torch.nn.Linear(5, 1)
    report = audit(torch.nn.Sequential(layer), (torch.randn(1, 5),))
    assert 10**report.summary.gradient.log10_frobenius_bound == pytest.approx(
        float(layer.weight.detach().norm()), rel=1e-6
    )


@pytest.mark.parametrize("size,output", [(1, 3), (2, 3), (5, 3), (4, 2)])
def test_bounds_hold_through_an_upsampling_adaptive_pool(size, output):
    """VGG's AdaptiveAvgPool2d(7) after a 1 x 1 map copies each input to 49 outputs (norm 7, not 1).
    All-ones weights make every other factor tight, so a pool constant too small shows."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(output),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * output * output, 1),
    ).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[4].weight.fill_(1.0)
        model[0].bias.fill_(1e3)  # every ReLU passes: the Jacobian is the whole linear map
    x = torch.randn(1, 2, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    gradient = audit(model, (x,), verify=False, measure=False).summary.gradient
    norm = jacobian_spectral_norm(model, x[0])
    assert norm <= 10**gradient.log10_frobenius_bound * (1 + 1e-9)
    assert norm <= 10**gradient.log10_certified_bound * (1 + 1e-9)
