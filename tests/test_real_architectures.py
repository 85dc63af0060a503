"""Real torchvision and timm classifiers (random init) audit cleanly, with every chain verified.

Slow (about a minute on 2 cores); skipped when torchvision or timm is not installed.
BatchNorm statistics and affine parameters are randomised, so folding is really exercised
(at init they are mean 0, var 1, gamma 1 or 0, beta 0).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from wssi_audit import audit
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
