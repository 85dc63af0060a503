"""Certified operator-norm bounds of weight layers, against a dense SVD built independently here.

The reference: the layer applied by torch to every basis vector of its input space is the
layer's matrix; its largest singular value is the truth. Every bound must lie above it (the
upper is proven), every lower value below it, for every layer kind, geometry and plan.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wssi_audit.analysis.conv_geometry import conv_axes
from wssi_audit.analysis.conv_gram import frequency_count, unique_frequencies
from wssi_audit.analysis.conv_plans import KINDS
from wssi_audit.analysis.operator_norms import (
    LayerSpec,
    NormBound,
    conv_operator_norm,
    linear_operator_norm,
    operator_norms,
)
from wssi_audit.analysis.pool_norms import pool_lipschitz
from wssi_audit.analysis.psd_bound import certified_top_eigenvalue, proves_bound
from wssi_audit.errors import InputError

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def dense_matrix(weight, size, stride=1, padding=0, dilation=1, groups=1, transposed=False, output_padding=0,
                 mode="zeros"):  # fmt: skip
    """The layer's matrix: torch applied to the identity basis of its input space."""
    dims = weight.dim() - 2
    channels = weight.shape[0] if transposed else weight.shape[1] * groups
    count = channels * math.prod(size)
    basis = torch.eye(count, dtype=torch.float64).reshape(count, channels, *size)
    if transposed:
        images = CONV_T[dims](basis, weight, None, stride, padding, output_padding, groups, dilation)
    else:
        if mode != "zeros":
            pads = [padding] * dims if isinstance(padding, int) else list(padding)
            basis = F.pad(basis, [p for q in reversed(pads) for p in (q, q)], mode=mode)
            padding = 0
        images = CONV[dims](basis, weight, None, stride, padding, dilation, groups)
    return images.reshape(count, -1).T


def true_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


def assert_brackets(bound, truth: float) -> None:
    assert bound.upper >= truth * (1 - 1e-12), (bound, truth)
    assert bound.lower <= truth * (1 + 1e-9) + 1e-300, (bound, truth)
    assert bound.lower <= bound.upper


@st.composite
def conv_layers(draw):
    """A random convolution (any kind torch has) with its input size, small enough to densify."""
    dims = draw(st.sampled_from([1, 1, 2, 2, 2, 3]))
    groups = draw(st.integers(1, 2))
    transposed = draw(st.booleans())
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    limit = {1: 9, 2: 6, 3: 3}[dims]
    kernel = [draw(st.integers(1, 4 if dims < 3 else 3)) for _ in range(dims)]
    stride = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    size = [draw(st.integers(1, limit)) for _ in range(dims)]
    mode = "zeros" if transposed else draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    bound = [max(0, min(n - (mode == "reflect"), d * (k - 1))) if mode != "zeros" else d * (k - 1)
             for n, k, d in zip(size, kernel, dilation)]  # fmt: skip
    padding = [draw(st.integers(0, b)) for b in bound]
    output_padding = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)] if transposed else 0
    shape = (c_in, c_out // groups, *kernel) if transposed else (c_out, c_in // groups, *kernel)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):  # a smooth (low-pass) kernel: the hard case for circulant embeddings
        weight = 0.2 * weight + weight.mean(dim=tuple(range(2, weight.dim())), keepdim=True)
    return dict(weight=weight, size=size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                transposed=transposed, output_padding=output_padding, mode=mode)  # fmt: skip


def _reference(layer) -> float | None:
    try:
        matrix = dense_matrix(layer["weight"], layer["size"], layer["stride"], layer["padding"], layer["dilation"],
                              layer["groups"], layer["transposed"], layer["output_padding"], layer["mode"])  # fmt: skip
    except RuntimeError:  # a geometry torch itself rejects
        return None
    return true_norm(matrix)


def _bound(layer, plan="auto", budget=None):
    extra = {} if budget is None else {"budget": budget}
    return conv_operator_norm(layer["weight"], layer["size"], layer["stride"], layer["padding"], layer["dilation"],
                              layer["groups"], layer["transposed"], layer["output_padding"], layer["mode"],
                              plan=plan, **extra)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_layers(), st.sampled_from(["auto", "cheapest", *KINDS]))
def test_upper_bound_is_never_below_the_dense_svd(layer, plan):
    truth = _reference(layer)
    assume(truth is not None)
    # "cheapest": a zero budget, so the cheapest plan of all (deflation where it applies)
    bound = _bound(layer, "auto", budget=0.0) if plan == "cheapest" else _bound(layer, plan)
    assert_brackets(bound, truth)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_layers(), st.data())
def test_mixed_plans_bracket_the_truth(layer, data):
    truth = _reference(layer)
    assume(truth is not None)
    axes = conv_axes(layer["weight"].shape[2:], layer["size"], layer["stride"], layer["padding"],
                     layer["dilation"], transposed=layer["transposed"], output_padding=layer["output_padding"],
                     padding_mode=layer["mode"])  # fmt: skip
    if any(a.outputs == 0 for a in axes):
        plan = "auto"
    else:
        plan = tuple(data.draw(st.sampled_from(KINDS)) for a in axes if len(a.taps) > 1)
    assert_brackets(_bound(layer, plan), truth)


def test_zero_weight_and_dead_layers_give_zero():
    weight = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    assert conv_operator_norm(weight, (5, 5), padding=1).upper == 0.0
    # Every output reads only padding: the map is zero whatever the weight.
    weight = torch.randn(2, 2, 2, dtype=torch.float64)
    assert true_norm(dense_matrix(weight, (1,), padding=2, dilation=3)) == 0.0
    assert conv_operator_norm(weight, (1,), padding=2, dilation=3) == NormBound(0.0, 0.0, "zero")


# -- tightness --------------------------------------------------------------------------------

RESNET_LIKE = [
    # (out, in, k, size, stride, padding): ResNet-style layers at the small sizes they run at
    (16, 16, 3, (8, 8), 1, 1),
    (16, 8, 3, (8, 8), 2, 1),
    (8, 3, 7, (16, 16), 2, 3),
    (16, 16, 3, (4, 4), 1, 1),
    (32, 16, 3, (4, 4), 2, 1),
    (32, 32, 3, (2, 2), 1, 1),
    (32, 32, 3, (1, 1), 1, 1),
    (16, 8, 1, (8, 8), 2, 0),
]


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("layer", RESNET_LIKE)
def test_default_bound_is_within_five_percent_of_the_dense_svd(layer, smooth):
    out, inp, k, size, stride, padding = layer
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out, inp, k, k, generator=generator, dtype=torch.float64)
    if smooth:
        weight = 0.2 * weight + weight.mean(dim=(2, 3), keepdim=True)
    truth = true_norm(dense_matrix(weight, size, stride, padding))
    bound = conv_operator_norm(weight, size, stride, padding)
    assert_brackets(bound, truth)
    assert bound.upper <= 1.05 * truth, bound
    assert bound.lower >= 0.8 * truth, bound


@pytest.mark.parametrize(
    ("plan", "size"),
    [
        ("circulant", (48,)),
        ("circulant", (20, 20)),
        (("exact", "circulant"), (8, 12)),
        (("circulant", "exact"), (12, 8)),
    ],
)
def test_circulant_embedding_is_tight_once_the_input_is_large(plan, size):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 4, *([3] * len(size)), generator=generator, dtype=torch.float64)
    truth = true_norm(dense_matrix(weight, size, 1, 1))
    bound = conv_operator_norm(weight, size, 1, 1, plan=plan)
    assert_brackets(bound, truth)
    assert bound.upper <= 1.05 * truth and bound.lower >= 0.9 * truth, bound


def test_a_small_budget_trades_tightness_for_cost_and_stays_an_upper_bound():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 8, 3, 3, generator=generator, dtype=torch.float64)
    truth = true_norm(dense_matrix(weight, (8, 8), 1, 1))
    tight, cheap = conv_operator_norm(weight, (8, 8), 1, 1), conv_operator_norm(weight, (8, 8), 1, 1, budget=1.0)
    assert cheap.method != tight.method and cheap.upper > tight.upper >= truth
    # A deflated matrix bound (a big matrix on a small budget) is still above the spectral norm,
    # and tight when the matrix is nearly low rank.
    left, right = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((300, 3), (3, 400)))
    low_rank = left @ right
    low_rank += 1e-3 * torch.randn(300, 400, generator=generator, dtype=torch.float64)
    deflated = linear_operator_norm(low_rank, budget=0.0)
    assert deflated.method == "deflated"
    assert true_norm(low_rank) <= deflated.upper <= 1.01 * true_norm(low_rank)


def test_transposed_convolution_has_the_norm_of_its_adjoint():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 3, 3, 3, generator=generator, dtype=torch.float64)
    transposed = conv_operator_norm(weight, (5, 5), 2, 1, transposed=True, output_padding=1)
    matrix = dense_matrix(weight, (5, 5), 2, 1, transposed=True, output_padding=1)
    assert_brackets(transposed, true_norm(matrix))
    assert transposed.upper <= 1.001 * true_norm(matrix)


def test_a_one_by_one_convolution_is_its_matrix():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(12, 7, 1, 1, generator=generator, dtype=torch.float64)
    truth = true_norm(weight[:, :, 0, 0])
    for size, stride in (((5, 5), 1), ((6, 6), 2), ((1, 1), 1)):
        bound = conv_operator_norm(weight, size, stride)
        assert truth <= bound.upper <= truth * (1 + 1e-3) and bound.method == "exact"


# -- linear, batches, determinism -------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**16), st.booleans())
def test_linear_bound_brackets_the_spectral_norm(rows, cols, seed, low_rank):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    if low_rank:
        weight = weight[:, :1] @ weight[:1, :]
    bound = linear_operator_norm(weight)
    truth = true_norm(weight)
    assert_brackets(bound, truth)
    assert bound.upper <= truth * (1 + 1e-3)


def test_batched_path_matches_single_layers_and_is_deterministic():
    generator = torch.Generator().manual_seed(5)
    conv = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64)
    linear = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    specs = [LayerSpec(conv, (6, 6), 1, 1), LayerSpec(linear), LayerSpec(conv, (6, 6), 1, 1), LayerSpec(conv, (3, 3))]
    first, second = operator_norms(specs), operator_norms(list(reversed(specs)))
    assert first == list(reversed(second))
    assert first[0] == first[2] == conv_operator_norm(conv, (6, 6), 1, 1)
    assert first[1] == linear_operator_norm(linear)
    assert first[3] != first[0]


# -- the certificate and its controls ----------------------------------------------------------


def _psd(eigenvalues, seed=0, complex_=False):
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    dtype = torch.complex128 if complex_ else torch.float64
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64).to(dtype))
    return basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64).to(dtype)) @ basis.mH


@pytest.mark.parametrize("complex_", [False, True])
def test_cholesky_test_proves_only_bounds_above_the_top_eigenvalue(complex_):
    values = [5.0, 4.999, 4.99, *([1.0] * 60)]
    matrix = _psd(values, complex_=complex_).unsqueeze(0)
    zero = torch.zeros(1, dtype=torch.float64)
    assert bool(proves_bound(matrix, 5.0 * (1 + 1e-9), zero))
    # Controls: a bound a hair below the top eigenvalue, or one the rounding allowance eats.
    assert not bool(proves_bound(matrix, 5.0 * (1 - 1e-7), zero))
    assert not bool(proves_bound(matrix, 5.0 * (1 + 1e-9), torch.tensor([1e-6], dtype=torch.float64)))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 64), st.integers(1, 3), st.integers(0, 2**16), st.sampled_from(["flat", "cluster", "rank1"]))
def test_certified_top_eigenvalue_is_above_every_eigenvalue(size, batch, seed, spectrum):
    generator = torch.Generator().manual_seed(seed)
    stack = []
    for b in range(batch):
        if spectrum == "rank1":
            values = [0.0] * (size - 1) + [float(b + 1)]
        elif spectrum == "cluster":
            values = (3.0 - 1e-4 * torch.rand(size, generator=generator, dtype=torch.float64)).tolist()
        else:
            values = torch.rand(size, generator=generator, dtype=torch.float64).tolist()
        stack.append(_psd(values, seed + b))
    matrices = torch.stack(stack)
    truth = float(torch.linalg.eigvalsh(matrices).max())
    top = certified_top_eigenvalue(matrices)
    assert top.upper >= truth * (1 - 1e-12) and top.upper <= truth * 1.002 + 1e-12
    assert top.estimate <= truth * (1 + 1e-9) + 1e-12


def test_a_wrong_matrix_is_not_certified_for_the_right_one():
    """Control: the bound certifies the matrix it was given; a different matrix fails the test."""
    small, large = _psd([1.0] * 10 + [2.0]).unsqueeze(0), _psd([1.0] * 10 + [3.0], seed=1).unsqueeze(0)
    bound = certified_top_eigenvalue(small).upper
    assert bool(proves_bound(small, bound, torch.zeros(1, dtype=torch.float64)))
    assert not bool(proves_bound(large, bound, torch.zeros(1, dtype=torch.float64)))


# -- pools -------------------------------------------------------------------------------------


POOLS = [
    ("avg", (7, 7), dict(kernel_size=3, stride=2, padding=1)),
    ("avg", (6, 5), dict(kernel_size=2, stride=2)),
    ("avg", (5, 5), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avg", (4, 4), dict(kernel_size=3, stride=1, padding=1, divisor_override=4)),
    ("adaptive_avg", (7, 5), dict(output_size=(3, 2))),
    ("adaptive_avg", (4, 4), dict(output_size=(1, 1))),
]


@pytest.mark.parametrize(("kind", "size", "attrs"), POOLS)
def test_average_pool_norm_is_its_dense_matrix_norm(kind, size, attrs):
    count = math.prod(size)
    basis = torch.eye(count, dtype=torch.float64).reshape(count, 1, *size)
    if kind == "avg":
        images = F.avg_pool2d(basis, **attrs)
    else:
        images = F.adaptive_avg_pool2d(basis, attrs["output_size"])
    truth = true_norm(images.reshape(count, -1).T)
    bound = pool_lipschitz(kind, size, **attrs)
    assert_brackets(bound, truth)
    assert bound.upper <= truth * (1 + 1e-3)


@pytest.mark.parametrize(
    ("size", "attrs", "expected"),
    [
        ((16, 16), dict(kernel_size=3, stride=2, padding=1), 2.0),  # ResNet's stem pool: ceil(3/2)^2 windows
        ((1, 1), dict(kernel_size=3, stride=2, padding=1), 1.0),  # one window: a copy
        ((4, 4), dict(kernel_size=2, stride=2), 1.0),  # disjoint windows
        ((5, 5), dict(kernel_size=3, stride=1, padding=1), 3.0),
        ((5, 5), dict(kernel_size=2, stride=1, dilation=2), 2.0),
    ],
)
def test_max_pool_lipschitz_constant_is_attained_by_a_spike(size, attrs, expected):
    bound = pool_lipschitz("max", size, **attrs)
    assert bound.upper == pytest.approx(expected)
    # Attained: a spike where the most windows overlap moves every one of them.
    best = 0.0
    for position in range(math.prod(size)):
        x = torch.zeros(1, 1, *size, dtype=torch.float64)
        x.view(-1)[position] = 1.0
        best = max(best, float(F.max_pool2d(x, **attrs).norm()))
    assert best == pytest.approx(bound.upper)
    # And never exceeded: random pairs of inputs.
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, b = (torch.randn(1, 1, *size, generator=generator, dtype=torch.float64) for _ in range(2))
        assert float((F.max_pool2d(a, **attrs) - F.max_pool2d(b, **attrs)).norm()) <= bound.upper * float(
            (a - b).norm()
        )


# -- input errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: conv_operator_norm(w, (5, 5), groups=3), "groups"),
        (lambda w: conv_operator_norm(w, (5,)), "does not match"),
        (lambda w: conv_operator_norm(w, (5, 5), padding_mode="mirror"), "padding mode"),
        (lambda w: conv_operator_norm(w, (1, 1)), "larger than the padded input"),
        (lambda w: conv_operator_norm(w, (5, 5), padding="full"), "padding"),
        (lambda w: conv_operator_norm(w, (5, 5), plan="fast"), "plan"),
        (lambda w: conv_operator_norm(w, (5, 5), padding=9, padding_mode="reflect"), "too large"),
        (lambda w: conv_operator_norm(w[0, 0], (5, 5)), "spatial axes"),
        (lambda w: conv_operator_norm(w * float("nan"), (5, 5)), "non-finite"),
        (lambda w: linear_operator_norm(w.flatten(1) * float("inf")), "non-finite"),
    ],
)
def test_bad_arguments_are_input_errors(call, message):
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(InputError, match=message):
        call(weight)


def test_a_deflated_folded_convolution_reports_a_lower_value_of_the_convolution():
    """Found by the property test: the folded matrix's norm (overlap axis) is above ||A||, so it
    must not be reported as the lower value."""
    weight = torch.tensor([[[[1.5410, -0.2934]]], [[[-2.1788, 0.5684]]]], dtype=torch.float64)
    layer = dict(weight=weight, size=[1, 2], stride=[1, 2], padding=[0, 1], dilation=[1, 1], groups=1,
                 transposed=True, output_padding=[0, 0], mode="zeros")  # fmt: skip
    bound = _bound(layer, "auto", budget=0.0)
    assert "deflated" in bound.method
    assert_brackets(bound, _reference(layer))


@given(st.lists(st.integers(1, 12), max_size=3))
def test_the_frequency_count_is_the_number_of_frequencies_listed(periods):
    """The plan search counts frequencies in closed form; the Gram blocks list them. Both must
    agree, and the list must hold exactly one of each pair {omega, -omega}."""
    listed = unique_frequencies(periods)
    assert frequency_count(periods) == len(listed)

    def negative(r):
        return tuple((-x) % p for x, p in zip(r, periods))

    kept = set(listed)
    assert kept | {negative(r) for r in listed} == set(itertools.product(*(range(p) for p in periods)))
    assert len(kept) == len(listed) and all(negative(r) == r or negative(r) not in kept for r in listed)


def test_an_axis_too_long_to_bound_is_an_input_error_at_once():
    """A crafted padding of 2^31 once looped for hours building the axis tables; the real axes
    just below the limit still get theirs."""
    with pytest.raises(InputError, match="too long to bound"):
        conv_axes((3, 3), (8, 8), padding=2**31)
    (axis, _) = conv_axes((3, 3), (8, 8), padding=1000)  # 2006 outputs x 3 taps: fine
    assert axis.outputs == 8 + 2  # outputs reading only padding are dropped
    with pytest.raises(InputError, match="too long"):
        pool_lipschitz("avg", (2**14,), kernel_size=2, stride=1, padding=1)
    assert pool_lipschitz("avg", (2**10,), kernel_size=2, stride=1, padding=1).upper > 0
