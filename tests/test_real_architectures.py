"""Real torchvision and timm classifiers (random init) audit cleanly, with every chain verified.

Slow (about a minute on 2 cores); skipped when torchvision or timm is not installed.
BatchNorm statistics and affine parameters are randomised, so folding is really exercised
(at init they are mean 0, var 1, gamma 1 or 0, beta 0).
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from wssi_audit import analyze, audit
from wssi_audit.analysis.weights import effective_weight, shift_layers
from wssi_audit.models import randomize_batch_norm
from wssi_audit.report import Report

pytestmark = pytest.mark.slow

INPUT = (1, 3, 64, 64)


@dataclass(frozen=True)
class Expected:
    library: str  # "torchvision" | "timm"
    name: str
    identity_blocks: int = 0
    projection_blocks: int = 0
    folded_bn: int = 0
    chain_lengths: dict[int, int] = field(default_factory=dict)  # chain length -> how many
    barriers: dict[str, int] = field(default_factory=dict)  # op -> how many barrier nodes
    homogeneous_weight_fraction: float = 1.0


CASES = [
    Expected("torchvision", "resnet18", 5, 3, 20, {2: 8, 1: 5}),
    Expected("torchvision", "resnet50", 12, 4, 53, {3: 16, 1: 6}),
    Expected("torchvision", "vgg11", 0, 0, 0, {11: 1}),
    # ReLU6 is a barrier; only project conv -> next expand conv (no activation between) chains.
    Expected("torchvision", "mobilenet_v2", 0, 0, 52, {2: 2, 1: 49}, {"relu6": 35}, 0.207),
    # Pre-activation BN (norm1 of every dense layer, transitions, norm5) has no weight layer
    # before it: a standalone affine barrier. conv1 + norm2 -> relu -> conv2 is the chain.
    Expected("torchvision", "densenet121", 0, 0, 59, {2: 58, 1: 5}, {"batch_norm": 62}, 0.782),
    # timm's BatchNormAct2d traces as F.batch_norm + activation: folded all the same.
    Expected("timm", "resnet18", 5, 3, 20, {2: 8, 1: 5}),
    Expected("timm", "resnet50", 12, 4, 53, {3: 16, 1: 6}),
]


def build(case: Expected) -> nn.Module:
    torch.manual_seed(0)
    if case.library == "torchvision":
        models = pytest.importorskip("torchvision.models")
        model = getattr(models, case.name)(weights=None)
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model(case.name, pretrained=False)
    return randomize_batch_norm(model)


def example_input(shape: tuple[int, ...] = INPUT, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _audited(library: str, name: str) -> Report:
    return audit(build(_case(library, name)), (example_input(),))


def audited(case: Expected) -> Report:
    """The audit of a case (auto method, verified), shared by tests that compare with it."""
    return _audited(case.library, case.name)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.library}-{c.name}" for c in CASES])
def test_real_architecture_audits_with_every_chain_verified(case: Expected) -> None:
    report = audited(case)
    summary = report.summary

    assert report.trace.method == "fx"  # torchvision 0.29's VGG traces too (science.md s.9 saw it fail)
    assert report.trace.coverage == 1.0
    assert not report.trace.unanalyzed
    assert summary.all_verified is True
    assert summary.max_verification_error is not None and summary.max_verification_error < 1e-9
    assert summary.gradient.log10_frobenius_bound is not None and math.isfinite(summary.gradient.log10_frobenius_bound)

    shortcuts = Counter(block.shortcut for block in report.residual_blocks)
    assert shortcuts == Counter({"identity": case.identity_blocks, "projection": case.projection_blocks}) - Counter()
    assert summary.residual_blocks == case.identity_blocks + case.projection_blocks
    assert sum(layer.folded_bn is not None for layer in report.layers) == case.folded_bn
    assert Counter(len(chain.layers) for chain in report.chains) == Counter(case.chain_lengths)
    assert Counter(barrier.op for barrier in report.barriers) == Counter(case.barriers)
    assert summary.homogeneous_weight_fraction == pytest.approx(case.homogeneous_weight_fraction, abs=1e-3)


def _case(library: str, name: str) -> Expected:
    return next(c for c in CASES if c.library == library and c.name == name)


def test_vgg_through_torch_export_matches_fx() -> None:
    """The export front-end (the fallback when symbolic tracing fails) finds the same chain."""
    case = _case("torchvision", "vgg11")
    by_fx = audited(case)
    by_export = audit(build(case), (example_input(),), method="export")
    assert by_export.trace.method == "export"
    assert by_export.trace.coverage == 1.0
    assert by_export.summary.all_verified is True
    assert [c.weights for c in by_export.chains] == [c.weights for c in by_fx.chains]
    assert by_export.summary.gradient.log10_frobenius_bound == pytest.approx(
        by_fx.summary.gradient.log10_frobenius_bound
    )


def test_untraceable_forward_falls_back_to_torch_export() -> None:
    """A shape check in forward breaks symbolic tracing; auto must fall back to torch.export."""
    models = pytest.importorskip("torchvision.models")

    class ShapeChecked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = models.vgg11(weights=None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != x.shape[-2]:
                raise ValueError("square inputs only")
            return self.net(x)

    torch.manual_seed(0)
    model = ShapeChecked().eval()
    with pytest.raises(Exception):  # noqa: B017 - whatever symbolic tracing raises
        torch.fx.symbolic_trace(model)
    report = audit(model, (example_input(),), verify=False)  # export + verification: test above
    assert report.trace.method == "export"
    assert report.trace.coverage == 1.0
    assert [len(c.layers) for c in report.chains] == [11]


def jacobian_spectral_norm(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int = 6) -> float:
    """||d model / dx||_2 at x by power iteration on J^T J (jvp then vjp): a lower estimate."""
    from torch.func import jvp, vjp

    vector = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    _, pullback = vjp(model, x)
    sigma = 0.0
    for _ in range(steps):
        vector = vector / vector.norm()
        _, image = jvp(model, (x,), (vector,))
        sigma = float(image.detach().norm())
        (vector,) = pullback(image)
    return sigma


def test_input_gradient_bound_holds_on_resnet18() -> None:
    """science.md s.5: the bound must hold on every input; check the Jacobian on a few."""
    model = build(_case("torchvision", "resnet18"))
    shape = (1, 3, 32, 32)
    bound = audit(model, (example_input(shape),), verify=False).summary.gradient.log10_frobenius_bound
    assert bound is not None and math.isfinite(bound)
    for seed in range(3):
        x = example_input(shape, seed)
        assert math.log10(jacobian_spectral_norm(model, x)) <= bound


# -- four structures timm builds that once read wrongly (issue 11) -----------------------------
# The real timm factories, random init, BatchNorm randomised, small inputs; Res2Net and TResNet
# one block per stage (their factories take `layers`), RepVGG-A0 and LeViT-128S whole.
TIMM_STRUCTURES = {
    "res2net50_14w_8s": ({"layers": [1, 1, 1, 1]}, (1, 3, 32, 32)),
    "repvgg_a0": ({}, (1, 3, 32, 32)),
    "levit_128s": ({"img_size": 64}, (1, 3, 64, 64)),
    "tresnet_m": ({"layers": [1, 1, 1, 1]}, (1, 3, 64, 64)),
}


@functools.cache
def _timm_case(name: str) -> tuple[nn.Module, torch.Tensor, Any]:
    timm = pytest.importorskip("timm")
    kwargs, shape = TIMM_STRUCTURES[name]
    torch.manual_seed(0)
    model = randomize_batch_norm(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    x = example_input(shape)
    return model, x, analyze(model, (x,))


@functools.cache
def _float64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def _shifted_output(model: nn.Module, x: torch.Tensor, overrides: dict[str, torch.Tensor]) -> torch.Tensor:
    """The real model's float64 output with some state_dict tensors replaced."""
    with torch.no_grad():
        return functional_call(_float64(model), overrides, (x.double(),), strict=False)


def _relative_change(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((other - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("name", list(TIMM_STRUCTURES))
def test_every_claimed_chain_holds_under_an_independent_shift(name: str) -> None:
    """Each chain of 2+ layers: the audit's self-check says verified, and a shift written here
    (random factors, prod g = 1, via shift_layers) leaves the real model's output unchanged,
    while the uncompensated first factor alone moves it (the check can fail)."""
    model, x, analysis = _timm_case(name)
    assert analysis.report.summary.all_verified is True
    assert analysis.report.trace.coverage == 1.0
    reference = _shifted_output(model, x, {})
    rng = random.Random(0)
    for chain in analysis.structure.chains:
        if len(chain.layers) < 2:
            continue
        draws = [rng.uniform(-1.0, 1.0) for _ in chain.layers]
        factors = [d - sum(draws) / len(draws) for d in draws]
        shifted = shift_layers(chain.layers, factors, analysis.graph.tensors)
        assert _relative_change(reference, _shifted_output(model, x, shifted)) < 1e-9, chain.weights
        uncompensated = shift_layers(chain.layers[:1], [1.0], analysis.graph.tensors, log10_output_scale=1.0)
        assert _relative_change(reference, _shifted_output(model, x, uncompensated)) > 1e-3, chain.weights


def test_res2net_chains_run_through_split_and_cat() -> None:
    """Bottle2neck: conv1 -> split into 8 -> 7 branch convs (added into each other) -> cat -> conv3.
    The chain is conv1 -> conv3; the branch convs ride on conv1's scale (weights kept, biases
    scaled); each block is a residual block around that chain. Before: 38 one-layer chains, 0 blocks."""
    model, x, analysis = _timm_case("res2net50_14w_8s")
    long = [chain for chain in analysis.structure.chains if len(chain.layers) > 1]
    assert [[layer.name for layer in chain.layers] for chain in long] == [
        [f"layer{i}.0.conv1", f"layer{i}.0.conv3"] for i in range(1, 5)
    ]
    for chain in long:
        assert sorted(r.name for r in chain.layers[0].carried) == [
            f"{chain.layers[0].name[: -len('conv1')]}convs.{k}" for k in range(7)
        ]
    report = analysis.report
    assert Counter(block.shortcut for block in report.residual_blocks) == Counter({"projection": 4})
    assert all(len(block.branch_weights) == 2 for block in report.residual_blocks)
    # The control: the same shift without scaling the carried layers' biases breaks the output.
    chain = long[0]
    carried, chain.layers[0].carried = chain.layers[0].carried, []
    try:
        bare = shift_layers(chain.layers, [1.0, -1.0], analysis.graph.tensors)
    finally:
        chain.layers[0].carried = carried
    assert _relative_change(_shifted_output(model, x, {}), _shifted_output(model, x, bare)) > 1e-3


def test_repvgg_parallel_branches_are_not_projection_shortcuts() -> None:
    """RepVggBlock adds a 3x3 and a 1x1 conv of the same input (and a BatchNorm of it): parallel
    single layers, neither a shortcut around the other. Before: 22 'projection' blocks."""
    _, _, analysis = _timm_case("repvgg_a0")
    blocks = analysis.structure.blocks
    assert Counter(block.shortcut for block in blocks) == Counter({"parallel": 22})
    for block in blocks:
        kernels = sorted(tuple(layer.attrs["kernel_size"]) for layer in (*block.branch.layers, block.projection))
        assert kernels == [(1, 1), (3, 3)]
    # The identity branch's BatchNorm reads the block input directly: no weight layer to fold into.
    assert Counter(b.op for b in analysis.report.barriers) == Counter({"batch_norm": 17})


def test_levit_batch_norm_after_linear_and_flatten_is_folded() -> None:
    """LinearNorm: Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as: BatchNorm per feature of
    the Linear, folded. Differential check against timm's own LinearNorm.fuse(). Before: 48 BatchNorms
    'without a weight layer before it'; now only the heads' pre-Linear BatchNorms are."""
    timm_levit = pytest.importorskip("timm.models.levit")
    model, _, analysis = _timm_case("levit_128s")
    barriers = [b for b in analysis.report.barriers if b.op == "batch_norm"]
    assert sorted(b.node for b in barriers) == ["head.bn", "head_dist.bn"]
    layers = {layer.name: layer for layer in analysis.structure.layers}
    linear_norms = {name: m for name, m in model.named_modules() if isinstance(m, timm_levit.LinearNorm)}
    assert linear_norms
    for name, module in linear_norms.items():
        layer = layers[f"{name}.linear"]
        assert layer.bn is not None and layer.bn.name == f"{name}.bn"
        weight, bias = effective_weight(layer, analysis.graph.tensors)
        fused = module.fuse()
        assert torch.allclose(weight, fused.weight.double(), rtol=1e-5, atol=1e-7)
        assert torch.allclose(bias, fused.bias.double(), rtol=1e-5, atol=1e-6)


def test_tresnet_blur_filter_is_a_fixed_linear_map() -> None:
    """BlurPool2d convolves with a fixed (non-persistent buffer) binomial filter: a degree-1 map
    with a constant weight, not a weight 'computed at run time'; its Lipschitz bound holds."""
    blur = pytest.importorskip("timm.layers.blur_pool")
    model, _, analysis = _timm_case("tresnet_m")
    assert not [b for b in analysis.report.barriers if "run time" in b.reason]
    fixed = [node for node in analysis.graph.nodes.values() if node.op == "fixed_filter"]
    pools = [m for m in model.modules() if isinstance(m, blur.BlurPool2d)]
    assert len(fixed) == len(pools) > 0
    for node, pool in zip(fixed, pools):
        assert analysis.structure.statuses[node.name].status.value == "homogeneous"
        # power iteration on the real map at its traced input size: a lower estimate of the norm
        shape = analysis.graph.nodes[node.inputs[0]].attrs["out_shape"]
        vector = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        weight, stride = pool.filt.double(), pool.stride

        def blur(v: torch.Tensor, weight: torch.Tensor = weight, stride: int = stride) -> torch.Tensor:
            return F.conv2d(v, weight, stride=stride, groups=weight.shape[0])

        for _ in range(20):  # v <- B^T B v
            vector = vector / vector.norm()
            image, vector = torch.autograd.functional.vjp(blur, vector, blur(vector))
        assert float(image.norm()) <= node.attrs["lipschitz"] * (1 + 1e-9)
        assert float(image.norm()) >= 0.5 * node.attrs["lipschitz"]  # and not vacuous
