"""Chains, BatchNorm folding, tied weights, residual blocks and partial tracing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import example_model, with_bn_statistics
from wssi_audit import analyze, audit
from wssi_audit.errors import TraceError


def test_batch_norm_is_folded_with_the_folded_norms_reported():
    torch.manual_seed(0)
    model = with_bn_statistics(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)),
        (2, 3, 8, 8),
    )
    report = audit(model, (torch.randn(2, 3, 8, 8),))
    assert [c.layers for c in report.chains] == [["0", "3"]]
    assert [layer.folded_bn for layer in report.layers] == ["1", "4"]
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    assert report.layers[0].frobenius == pytest.approx(float(fused.weight.detach().double().norm()), rel=1e-6)
    assert report.layers[0].bias_norm == pytest.approx(float(fused.bias.detach().double().norm()), rel=1e-6)
    assert report.summary.all_verified is True


def test_batch_norm_in_training_mode_is_a_barrier():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).train()
    program = torch.export.export(model, (torch.randn(8, 4),), strict=False)
    report = audit(program, (torch.randn(8, 4),), verify=False)
    assert "batch_norm_train" in [b.op for b in report.barriers]
    assert [c.layers for c in report.chains] == [["0"], ["3"]]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.shared(F.relu(self.shared(F.relu(self.inp(x)))))))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_tied_weights_never_join_a_chain(method):
    report = audit(Tied(), (torch.randn(3, 4),), method=method)
    assert all("shared" not in layer for chain in report.chains for layer in chain.layers)
    tied = [b for b in report.barriers if "tied" in b.reason]
    assert len(tied) == 2
    assert report.summary.all_verified is True
    assert report.summary.gradient.log10_frobenius_bound is not None


@pytest.mark.parametrize("name", ["resnet_nobn", "resnet_bn"])
@pytest.mark.parametrize("method", ["fx", "export"])
def test_residual_blocks_with_identity_and_projection_shortcuts(name, method):
    model, x = example_model(name)
    report = audit(model, (x,), method=method)
    shortcuts = [b.shortcut for b in report.residual_blocks]
    assert shortcuts == ["identity", "identity", "projection", "identity"]
    projection = report.residual_blocks[2]
    assert projection.shortcut_weight == "layers.2.downsample.0.weight"
    assert projection.branch_weights == ["layers.2.conv1.weight", "layers.2.conv2.weight"]
    assert report.summary.all_verified is True
    assert report.summary.homogeneous_weight_fraction == 1.0
    assert report.trace.coverage == 1.0


def test_residual_bound_has_the_residual_form():
    """For a ResNet the propagated bound is ||W_in|| ||W_out|| prod(||s_b|| + prod ||V||) x conv factors,
    times the global average pool's 1/sqrt(positions)."""
    import math

    model, x = example_model("resnet_nobn")
    seen = []
    handle = model.pool.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape))
    model(x)
    handle.remove()
    analysis = analyze(model, (x,))
    report = analysis.report
    by_name = {layer.name: layer for layer in report.layers}

    def log_op(name: str) -> float:
        layer = by_name[name]
        kernel = layer.shape[2:] if layer.kind.startswith("conv") else []
        stride = 2 if name in ("layers.2.conv1", "layers.2.downsample.0") else 1
        factor = math.prod(math.ceil(k / stride) for k in kernel) if kernel else 1
        return layer.log10_frobenius + 0.5 * math.log10(factor)

    total = log_op("stem") + log_op("fc") - 0.5 * math.log10(math.prod(seen[0][2:]))
    for block in report.residual_blocks:
        branch = sum(log_op(w.removesuffix(".weight")) for w in block.branch_weights)
        shortcut = 0.0 if block.shortcut_weight is None else log_op(block.shortcut_weight.removesuffix(".weight"))
        total += math.log10(10**shortcut + 10**branch)
    assert report.summary.gradient.log10_frobenius_bound == pytest.approx(total, abs=1e-9)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if float(x.sum()) > 0 else -x


class WithUntraceablePart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.odd = DataDependent()
        self.second = nn.Linear(4, 4)
        self.third = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.third(F.relu(self.second(self.odd(F.relu(self.first(x))))))


def test_untraceable_submodule_becomes_a_reported_leaf():
    report = audit(WithUntraceablePart())
    assert report.trace.method == "fx+leaves"
    assert [u.node for u in report.trace.unanalyzed] == ["odd", "odd"] or "odd" in report.trace.unanalyzed[0].node
    assert report.trace.coverage < 1.0
    assert [c.layers for c in report.chains] == [["first"], ["second", "third"]]
    assert report.summary.all_verified is None  # no example input: nothing verified, and it says so


def test_untraceable_submodule_with_input_is_still_analysed_and_verified():
    report = audit(WithUntraceablePart(), (torch.randn(2, 4),))
    assert report.summary.all_verified is True
    assert [c.layers for c in report.chains][-1] == ["second", "third"]


class RootUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[0] > 0)):
            x = self.first(x)
        return x if bool(x.sum() > 0) else -x


def test_untraceable_root_without_input_is_one_clear_error():
    with pytest.raises(TraceError, match="--input-shape"):
        audit(RootUntraceable())


def test_no_example_input_means_not_verified_but_analysed():
    model, _ = example_model("cnn")
    report = audit(model)
    assert report.summary.all_verified is None
    assert all(c.verification in ("not_run", "trivial") for c in report.chains)
    assert report.summary.gradient.log10_frobenius_bound is not None


class NormalizedInput(nn.Module):
    """(x - mean) / std inside the model, as robustness benchmarks require."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5]))
        self.register_buffer("std", torch.tensor([0.25]))
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(F.relu(self.first((x - self.mean) / self.std)))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_normalization_inside_the_model_keeps_the_bound(method):
    model = NormalizedInput()
    report = audit(model, (torch.randn(2, 4),), method=method)
    assert [c.layers for c in report.chains] == [["first", "second"]]
    assert [b.op for b in report.barriers] == ["add_const"]
    expected = math.log10(4.0 * float(model.first.weight.detach().norm()) * float(model.second.weight.detach().norm()))
    assert report.summary.gradient.log10_frobenius_bound == pytest.approx(expected, rel=1e-6)


class LinearFlattenNorm(nn.Module):
    """LeViT's LinearNorm: Linear on (B, N, C) -> flatten(0, 1) -> BatchNorm1d(C) -> reshape_as."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.second(F.relu(self.bn(h.flatten(0, 1)).reshape_as(h)))


class ConvFlattenNorm(nn.Module):
    """conv -> flatten(1) -> BatchNorm1d(C*H*W): a statistic per (channel, position), not per
    output channel of the conv: no fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm1d(2 * 4 * 4)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.conv(x).flatten(1))))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_batch_norm_after_linear_and_flatten_is_folded_per_feature(method):
    model = with_bn_statistics(LinearFlattenNorm(), (5, 3, 4))
    x = torch.randn(5, 3, 4)
    report = audit(model, (x,), method=method)
    assert [layer.folded_bn for layer in report.layers] == ["bn", None]
    assert [c.layers for c in report.chains] == [["first", "second"]]
    assert report.barriers == [] and report.summary.all_verified is True
    # the folded norm is the norm of the fused layer, computed here
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    fused = (model.first.weight * scale[:, None]).detach().double()
    assert report.layers[0].frobenius == pytest.approx(float(fused.norm()), rel=1e-6)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_batch_norm_over_flattened_positions_is_not_folded(method):
    model = with_bn_statistics(ConvFlattenNorm(), (4, 1, 4, 4))
    report = audit(model, (torch.randn(4, 1, 4, 4),), method=method)
    assert [layer.folded_bn for layer in report.layers] == [None, None]
    assert [b.op for b in report.barriers] == ["batch_norm"]
    assert report.summary.all_verified is True


def test_batch_norm_after_views_is_not_folded_without_traced_shapes():
    """No example input, no shapes: the per-feature condition cannot be checked, so no fold."""
    report = audit(with_bn_statistics(LinearFlattenNorm(), (5, 3, 4)))
    assert [layer.folded_bn for layer in report.layers] == [None, None]


class Blurred(nn.Module):
    """A fixed (non-persistent buffer) depthwise filter between two convs, as timm's BlurPool2d."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 3, 3, padding=1)
        coefficients = torch.tensor([1.0, 2.0, 1.0]) / 4
        self.register_buffer("filt", (coefficients[:, None] * coefficients)[None, None].repeat(3, 1, 1, 1), False)
        self.second = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.first(x))
        return self.second(F.conv2d(F.pad(h, [1, 1, 1, 1], mode="reflect"), self.filt, stride=2, groups=3))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_fixed_buffer_weight_is_a_fixed_linear_map_not_a_run_time_weight(method):
    torch.manual_seed(0)
    model, x = Blurred(), torch.randn(1, 1, 8, 8)
    analysis = analyze(model, (x,), method=method)
    report = analysis.report
    assert [c.layers for c in report.chains] == [["first", "second"]]
    assert report.barriers == [] and report.summary.all_verified is True
    (node,) = [n for n in analysis.graph.nodes.values() if n.op == "fixed_filter"]
    # the bound it carries holds against the filter's exact operator norm at this size (dense matrix)
    size = 3 * 10 * 10
    basis = torch.eye(size, dtype=torch.float64).reshape(size, 3, 10, 10)
    matrix = F.conv2d(basis, model.filt.double(), stride=2, groups=3).reshape(size, -1)
    assert float(torch.linalg.matrix_norm(matrix, ord=2)) <= node.attrs["lipschitz"] + 1e-12
