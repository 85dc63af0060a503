"""The certified per-layer bounds on a real architecture: torchvision ResNet-18 at 32 x 32.

science.md s.5 (measured outside the project): the residual-aware product of exact per-layer
operator norms gives log10 7.15 on this model, the audit's Frobenius x overlap figure 28.7, and
the measured ||d logits / dx||_2 is about -0.9. The certified product must be at most 8 and never
below the measured gradient; each layer's certified upper bound must stay above an independent
estimate from below (power iteration through torch's own convolution at the layer's input size).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from wssi_audit.analysis.metrics import layer_norms, log10_input_gradient_bound
from wssi_audit.analysis.operator_norms import LayerSpec, operator_norms
from wssi_audit.analysis.weights import effective_weight
from wssi_audit.auditing import analyze
from wssi_audit.models import randomize_batch_norm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def resnet18():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = randomize_batch_norm(models.resnet18(weights=None, num_classes=10))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    analysis = analyze(model, (x,), verify=False)
    modules = dict(model.named_modules())
    sizes = {}
    handles = [
        m.register_forward_hook(lambda m, i, o, n=n: sizes.setdefault(n, tuple(i[0].shape[2:])) and None)
        for n, m in modules.items()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.AdaptiveAvgPool2d))
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    specs = []
    for layer in analysis.structure.layers:
        weight, _ = effective_weight(layer, analysis.graph.tensors)
        module = modules[layer.name]
        if isinstance(module, torch.nn.Conv2d):
            specs.append(LayerSpec(weight, sizes[layer.name], module.stride, module.padding, module.dilation))
        else:
            specs.append(LayerSpec(weight))
    return model, analysis, specs, operator_norms(specs), sizes["avgpool"]


def _log10_bound(analysis, log10_norms, pool_input):
    """The propagation with these layer norms; the final pool (a mean over its input positions,
    size read by a hook here) multiplies by 1/sqrt(positions)."""
    base = layer_norms(analysis.structure.layers, analysis.graph.tensors)
    pools = {n.name: -0.5 * math.log10(math.prod(pool_input)) for n in analysis.graph.nodes.values() if "avg" in n.op}
    assert len(pools) == 1
    replaced = {
        layer.name: dataclasses.replace(base[layer.name], log10_frobenius=value, log10_operator_factor=0.0)
        for layer, value in zip(analysis.structure.layers, log10_norms)
    }
    bound, why = log10_input_gradient_bound(analysis.graph, analysis.structure, replaced, node_lipschitz=pools)
    assert bound is not None, why
    return bound, log10_input_gradient_bound(analysis.graph, analysis.structure, base, node_lipschitz=pools)[0]


def _jacobian_norm(model, x):
    """||d logits / dx||_2 exactly: the 10 x 3072 Jacobian from 10 backward passes, then its SVD."""
    jacobian = torch.autograd.functional.jacobian(model, x).reshape(10, -1)
    return float(torch.linalg.matrix_norm(jacobian, ord=2))


def test_certified_product_is_at_most_8_decades_and_above_the_measured_gradient(resnet18):
    model, analysis, _, bounds, pool_input = resnet18
    certified, frobenius = _log10_bound(analysis, [math.log10(b.upper) for b in bounds], pool_input)
    from_lower, _ = _log10_bound(analysis, [math.log10(b.lower) for b in bounds], pool_input)
    assert certified <= 8.0, certified
    assert frobenius > certified + 15  # the audit's figure today, for contrast (28.7)
    assert from_lower <= certified  # the lower estimates propagate to a smaller figure
    double = model.double()
    for seed in range(3):
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert math.log10(_jacobian_norm(double, x)) <= certified
    model.float()


def _conv_power_iteration(spec: LayerSpec, steps: int = 60) -> float:
    """||conv|| from below, through torch's conv2d and its adjoint at the layer's input size."""
    weight = spec.weight.double()
    x = torch.randn(
        1, weight.shape[1], *spec.input_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    sigma = 0.0
    for _ in range(steps):
        x = x / x.norm()
        y = F.conv2d(x, weight, None, spec.stride, spec.padding, spec.dilation)
        sigma = float(y.norm())
        x = torch.autograd.functional.vjp(lambda v: F.conv2d(v, weight, None, spec.stride, spec.padding), x, y)[1]
    return sigma


def test_every_layer_bound_is_above_power_iteration_through_torch(resnet18):
    _, _, specs, default, _ = resnet18
    tight = operator_norms(specs, budget=3e10)  # enough for the tight plans on every layer
    for spec, bound, cheap in zip(specs, tight, default):
        assert cheap.upper >= bound.lower
        if spec.input_size is None:
            estimate = float(torch.linalg.matrix_norm(spec.weight.double(), ord=2))
        else:
            estimate = _conv_power_iteration(spec)
        assert estimate <= min(bound.upper, cheap.upper) * (1 + 1e-9), (spec.weight.shape, estimate, bound, cheap)
        # and the bound is tight: within 10 % of what power iteration reaches from below
        assert bound.upper <= 1.1 * estimate, (spec.weight.shape, spec.input_size, estimate, bound)


def test_the_audit_reports_this_certified_bound_from_its_own_traced_sizes(resnet18):
    """Differential: the audit's sizes come from the trace, this test's from forward hooks."""
    _, analysis, _, bounds, pool_input = resnet18
    certified, _ = _log10_bound(analysis, [math.log10(b.upper) for b in bounds], pool_input)
    gradient = analysis.report.summary.gradient
    assert gradient.log10_certified_bound == pytest.approx(certified, abs=1e-9), gradient.certified_note
    assert gradient.log10_certified_bound < gradient.log10_frobenius_bound - 15
    assert gradient.certified_method.startswith("operator norms at traced input sizes")
    for record, bound in zip(analysis.report.layers, bounds):
        assert record.log10_operator_norm == pytest.approx(math.log10(bound.upper), abs=1e-12), record.name


def test_an_onnx_file_gets_the_same_certified_bound(resnet18, tmp_path):
    """ONNX records no sizes in its nodes: the audit recovers them by one run of the file."""
    pytest.importorskip("onnx")
    model, analysis, _, _, _ = resnet18
    target = tmp_path / "resnet18.onnx"
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(model, (x,), str(target), dynamo=False)
    onnx_report = analyze(str(target), verify=False, measure=False).report
    expected = analysis.report.summary.gradient.log10_certified_bound
    assert onnx_report.summary.gradient.log10_certified_bound == pytest.approx(expected, abs=1e-6)
    assert "not traced" not in onnx_report.summary.gradient.certified_method
