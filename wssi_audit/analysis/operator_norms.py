"""Certified upper bounds on the l2 -> l2 operator norm of a weight layer at its traced input size.

A convolution is the linear map A = sum_t W_t (x) B_t over kernel taps t: W_t the (out x in)
matrix of tap t, B_t the 0/1 map saying which input position each output reads through that tap
(conv_geometry). Its operator norm is the square root of lambda_max(A^T A), and A^T A (or A A^T,
whichever is smaller) is assembled from the tap Gram blocks W_t^T W_t' without forming A.

Each spatial axis is treated in one of two ways, chosen per layer by cost:
- exactly: the axis's positions stay in the matrix (tight at any size, costly when large);
- by a circulant embedding: zero padding at size n embeds into a circular convolution of length
  N >= n + padding (a multiple of the stride), so A = P C E with E an isometric embedding and P a
  selection of rows, and ||A|| <= ||C||. In the polyphase form (a stride-s convolution is a
  stride-1 convolution of the s input phases) C is block circulant and the Fourier transform
  splits it into N/s independent blocks M(omega): ||C|| = max_omega ||M(omega)||. This is tight
  for large n and loose for small n (at 1 x 1 a 3 x 3 convolution is just its centre tap), which
  is why small axes are kept exact.
With every axis exact the bound is the exact norm; a 1 x 1 convolution and a linear layer are
just matrices. The upper bound is proven: the largest eigenvalue of each block is bounded by a
Cholesky test (psd_bound), with rounding margins; the lower value is the Rayleigh quotient
||A z|| / ||z|| of an explicit input z (the top eigenvector, or a windowed plane wave at the
worst frequency), so lower <= ||A|| <= upper.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from .conv_geometry import Axis, conv_axes
from .conv_gram import gram_blocks, unique_frequencies
from .conv_lower import lower_estimate
from .psd_bound import UNIT_ROUNDOFF, certified_top_eigenvalue

# Rough float64 operations a layer may spend on making its axes exact; beyond it, axes are
# embedded in circulants (still proven upper bounds, looser at small sizes).
DEFAULT_BUDGET = 2e9


@dataclass(frozen=True)
class NormBound:
    upper: float  # proven: ||A||_2 <= upper
    lower: float  # ||A z|| / ||z|| for a computed z: lower <= ||A||_2 up to rounding
    method: str  # how the upper bound was obtained, e.g. "exact", "circulant", "exact axis 0 + circulant"


@dataclass(frozen=True)
class LayerSpec:
    """One weight layer for `operator_norms`: a linear layer when input_size is None."""

    weight: torch.Tensor  # the effective weight (BatchNorm folded), as torch lays it out
    input_size: tuple[int, ...] | None = None  # spatial input size (no batch, no channels)
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    transposed: bool = False
    output_padding: Any = 0
    padding_mode: str = "zeros"


@dataclass
class _Problem:
    weight: torch.Tensor  # (groups, out, in, *kept taps per axis), float64
    axes: tuple[Axis, ...]  # the axes left after single-tap axes are factored out
    factor: float  # exact norm factor of the factored-out single-tap axes


# How each spatial axis is treated. "exact": its positions stay in the matrix. "circulant": the
# axis is embedded in a ring (conv_gram). "overlap": its taps become input channels and the axis
# disappears; ||A|| <= sqrt(most (output, tap) pairs reading one input) * ||the folded conv||.
KINDS = ("exact", "circulant", "overlap")


@dataclass(frozen=True)
class _Plan:
    kinds: tuple[str, ...]  # per axis of the problem
    cost: float  # rough float64 operations
    looseness: float  # a ranking, not a bound: rough log10 of how much the plan overshoots

    @property
    def method(self) -> str:
        if all(k == "exact" for k in self.kinds):
            return "exact"
        parts = []
        for kind in KINDS:
            axes = [str(i) for i, k in enumerate(self.kinds) if k == kind]
            if axes:
                parts.append(f"{kind} axis {','.join(axes)}")
        return " + ".join(parts)


@dataclass
class _Folded:
    """The problem a plan certifies: overlap axes folded into the input channels, and axes
    without a ring (reflect/replicate padding) replaced by a convolution of the padded input."""

    weight: torch.Tensor
    axes: tuple[Axis, ...]
    exact: tuple[bool, ...]
    periods: tuple[int, ...]
    factor: float  # sqrt(overlap) of folded axes times the padding maps' norms
    side: str


def _overlap(axis: Axis) -> int:
    """Most (output, tap) pairs that read one input position of this axis."""
    return int(axis.tap_matrices().sum(dim=(0, 1)).max())


def _fold(problem: _Problem, kinds: Sequence[str]) -> _Folded:
    weight, factor = problem.weight, 1.0
    folded = [i for i, k in enumerate(kinds) if k == "overlap"]
    kept = [i for i, k in enumerate(kinds) if k != "overlap"]
    if folded:
        groups, out, inp = weight.shape[:3]
        order = [0, 1, 2, *(3 + i for i in folded), *(3 + i for i in kept)]
        weight = weight.permute(order)
        kept_taps = [weight.shape[3 + len(folded) + j] for j in range(len(kept))]
        weight = weight.reshape(groups, out, -1, *kept_taps)
        factor *= math.sqrt(math.prod(_overlap(problem.axes[i]) for i in folded))
    axes, exact, periods = [], [], []
    for i in kept:
        axis = problem.axes[i]
        if kinds[i] == "exact":
            axes.append(axis)
            exact.append(True)
            periods.append(1)
            continue
        if axis.circulant_period() is None:
            axis, padding_norm = axis.padded()
            factor *= padding_norm
        ring = axis.circulant_period()
        assert ring is not None
        axes.append(axis)
        exact.append(False)
        periods.append(ring // axis.stride)
    groups, out, inp = weight.shape[:3]
    in_size = inp * math.prod(a.size if e else a.stride for a, e in zip(axes, exact))
    out_size = out * math.prod(a.outputs if e else 1 for a, e in zip(axes, exact))
    side = "input" if in_size < out_size else "output"
    return _Folded(weight, tuple(axes), tuple(exact), tuple(periods), factor, side)


def _plan(problem: _Problem, kinds: tuple[str, ...]) -> _Plan:
    folded = _fold_shape(problem, kinds)
    groups, out, inp, size, spatial, frequencies, taps, side = folded
    channels, other = (inp, out) if side == "input" else (out, inp)
    complex_factor = 1 if all(k != "circulant" for k in kinds) else 4
    cost = groups * (
        frequencies * complex_factor * (size**3 / 3 + 50 * size**2)
        + frequencies * 2 * spatial**2 * channels**2 * min(taps**2, 64)
        + taps**2 * channels**2 * other
    )
    looseness = 0.0
    for axis, kind in zip(problem.axes, kinds):
        if kind == "circulant":
            looseness += 0.15 / axis.size + (0.0 if axis.circulant_period() else 0.3)
        elif kind == "overlap":
            looseness += 0.5 * math.log10(max(_overlap(axis), 1)) * 0.6 + 0.01
    return _Plan(kinds, cost, looseness)


def _fold_shape(problem: _Problem, kinds: Sequence[str]) -> tuple[int, int, int, int, int, int, int, str]:
    """The sizes `_fold` would produce, without touching the weight."""
    groups, out, inp = problem.weight.shape[:3]
    for axis, kind in zip(problem.axes, kinds):
        if kind == "overlap":
            inp *= len(axis.taps)
    in_size, out_size, periods, taps = inp, out, [], 1
    for axis, kind in zip(problem.axes, kinds):
        if kind == "overlap":
            continue
        taps *= len(axis.taps)
        if kind == "exact":
            in_size *= axis.size
            out_size *= axis.outputs
        else:
            ring_axis = axis if axis.circulant_period() else axis.padded()[0]
            in_size *= ring_axis.stride
            periods.append(ring_axis.circulant_period() // ring_axis.stride)
    side = "input" if in_size < out_size else "output"
    size = in_size if side == "input" else out_size
    channels = inp if side == "input" else out
    frequencies = len(unique_frequencies(periods))
    return groups, out, inp, size, size // channels, frequencies, taps, side


def _choose_plan(problem: _Problem, mode: Any, budget: float) -> _Plan:
    count = len(problem.axes)
    if mode in KINDS:
        return _plan(problem, (mode,) * count)
    if isinstance(mode, (tuple, list)) and len(mode) == count and all(k in KINDS for k in mode):
        return _plan(problem, tuple(mode))
    if mode != "auto":
        raise InputError(f"plan {mode!r} is not 'auto', one of {', '.join(KINDS)} or one of those per axis")
    plans = [_plan(problem, kinds) for kinds in itertools.product(KINDS, repeat=count)]
    affordable = [p for p in plans if p.cost <= budget]
    if not affordable:
        return min(plans, key=lambda p: p.cost)
    return min(affordable, key=lambda p: (round(p.looseness, 9), p.cost))


# -- the bound ----------------------------------------------------------------------------------


def _problem(weight: torch.Tensor, axes: tuple[Axis, ...], groups: int) -> _Problem | None:
    """Grouped weight with dead taps removed and single-tap axes factored out (None: A = 0)."""
    if any(axis.outputs == 0 for axis in axes):
        return None
    w = weight.detach().to(torch.float64)
    w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    for index, axis in enumerate(axes):
        w = w.index_select(3 + index, torch.tensor(axis.taps))
    kept, factor = [], 1.0
    for index, axis in reversed(list(enumerate(axes))):
        if len(axis.taps) == 1:
            counts = axis.tap_matrices()[0].sum(0)
            factor *= math.sqrt(float(counts.max()))
            w = w.squeeze(3 + index)
        else:
            kept.insert(0, axis)
    return _Problem(w, tuple(kept), factor)


# Frequencies tried along overlap axes for the lower estimate (the plan has no worst one there).
_COARSE = tuple(2 * math.pi * r / 8 for r in range(5))


def _bound(problem: _Problem | None, mode: Any, budget: float, seed: int) -> NormBound:
    if problem is None or not bool(problem.weight.any()):
        return NormBound(0.0, 0.0, "zero")
    plan = _choose_plan(problem, mode, budget)
    folded = _fold(problem, plan.kinds)
    blocks = gram_blocks(folded.weight, folded.axes, folded.exact, folded.periods, folded.side)
    top = certified_top_eigenvalue(blocks.matrices, blocks.errors, seed=seed)
    upper = math.sqrt(top.upper) * folded.factor * problem.factor * (1 + 8 * UNIT_ROUNDOFF)
    group, frequency = divmod(top.index, len(blocks.frequencies))
    if all(k == "exact" for k in plan.kinds):
        lower = math.sqrt(max(top.estimate, 0.0))
    else:
        lower = _lower(problem, plan, folded, blocks.frequencies[frequency], group, top.vector)
    lower = min(lower * problem.factor, upper)
    return NormBound(upper, lower, plan.method if problem.axes else "exact")


def _lower(problem: _Problem, plan: _Plan, folded: _Folded, frequency: tuple[int, ...], group: int,
           vector: torch.Tensor) -> float:  # fmt: skip
    """The windowed-plane-wave estimate on the true axes: circulant axes at the certified worst
    frequency, overlap axes at a few coarse ones."""
    exact = tuple(k == "exact" for k in plan.kinds)
    per_axis: list[tuple[float, ...]] = []
    circulant = 0
    for kind, axis in zip(plan.kinds, problem.axes):
        if kind == "circulant":
            ring_axis = axis if axis.circulant_period() else axis.padded()[0]
            period = ring_axis.circulant_period() // ring_axis.stride
            per_axis.append((2 * math.pi * frequency[circulant] / period,))
            circulant += 1
        elif kind == "overlap":
            per_axis.append(_COARSE)
    candidates = list(itertools.product(*per_axis))
    same_layout = "overlap" not in plan.kinds
    start = vector if same_layout else None
    side = folded.side if same_layout else _natural_side(problem, exact)
    return lower_estimate(problem.weight[group], problem.axes, exact, candidates, side, start)


def _natural_side(problem: _Problem, exact: tuple[bool, ...]) -> str:
    out, inp = problem.weight.shape[1:3]
    in_size = inp * math.prod(a.size if e else a.stride for a, e in zip(problem.axes, exact))
    out_size = out * math.prod(a.outputs if e else 1 for a, e in zip(problem.axes, exact))
    return "input" if in_size < out_size else "output"


def linear_operator_norm(weight: torch.Tensor, *, seed: int = 0) -> NormBound:
    """||W||_2 of a (out, in) matrix (or any weight flattened to out x rest), proven from above."""
    matrix = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    return _bound(_Problem(matrix.view(1, *matrix.shape), (), 1.0), "exact", math.inf, seed)


def conv_operator_norm(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: Any = 0,
    padding_mode: str = "zeros",
    *,
    budget: float = DEFAULT_BUDGET,
    plan: Any = "auto",
    seed: int = 0,
) -> NormBound:
    """Bounds on the l2 operator norm of the convolution (or transposed convolution) with this
    weight, as torch lays it out, at the given spatial input size.

    `plan`: "auto" (the tightest treatment of the axes that `budget` float64 operations allow),
    "exact" (every axis exact: the dense matrix's norm), "circulant" or "overlap" (every axis so),
    or a tuple with one of those per spatial axis left after single-tap axes are factored out.
    """
    weight = weight.detach()
    if weight.dim() < 3:
        raise InputError(f"a convolution weight needs spatial axes, got shape {tuple(weight.shape)}")
    groups = int(groups or 1)
    channels = weight.shape[0]
    if groups < 1 or channels % groups:
        raise InputError(f"{channels} channels do not split into {groups} groups")
    axes = conv_axes(
        weight.shape[2:],
        [int(n) for n in input_size],
        stride,
        padding,
        dilation,
        transposed=transposed,
        output_padding=output_padding,
        padding_mode=padding_mode,
    )
    return _bound(_problem(weight, axes, groups), plan, budget, seed)


def operator_norms(layers: Sequence[LayerSpec], *, budget: float = DEFAULT_BUDGET) -> list[NormBound]:
    """`conv_operator_norm` / `linear_operator_norm` for many layers; a weight seen twice at the
    same geometry is computed once. Each layer is seeded alike, so results do not depend on order."""
    results: dict[tuple[Any, ...], NormBound] = {}
    out = []
    for spec in layers:
        key = (
            spec.weight.data_ptr(),
            tuple(spec.weight.shape),
            spec.input_size,
            str(spec.stride),
            str(spec.padding),
            str(spec.dilation),
            spec.groups,
            spec.transposed,
            str(spec.output_padding),
            spec.padding_mode,
        )
        if key not in results:
            if spec.input_size is None:
                results[key] = linear_operator_norm(spec.weight)
            else:
                results[key] = conv_operator_norm(
                    spec.weight,
                    spec.input_size,
                    spec.stride,
                    spec.padding,
                    spec.dilation,
                    spec.groups,
                    spec.transposed,
                    spec.output_padding,
                    spec.padding_mode,
                    budget=budget,
                )
        out.append(results[key])
    return out
