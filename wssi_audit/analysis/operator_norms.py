"""Certified upper bounds on the l2 -> l2 operator norm of a weight layer at its traced input size.

A convolution is the linear map A = sum_t W_t (x) B_t over kernel taps t: W_t the (out x in)
matrix of tap t, B_t the 0/1 map saying which input position each output reads through that tap
(conv_geometry). ||A||_2 is the square root of lambda_max(A^T A), and A^T A (or A A^T, whichever
is smaller) is assembled from the tap Gram blocks W_t^T W_t' without forming A (conv_gram).

Each spatial axis is treated in one of three ways (conv_plans), chosen by cost:
- exact: the axis's positions stay in the matrix (tight at any size, costly when large);
- circulant: zero padding at size n embeds into a circular convolution of length N >= n + padding
  (a multiple of the stride), so A = P C E with E an isometric embedding and P a selection of
  rows, and ||A|| <= ||C||; in the polyphase form (a stride-s convolution is a stride-1
  convolution of the s input phases) the Fourier transform splits C into N/s blocks M(omega) and
  ||C|| = max_omega ||M(omega)||. Tight for large n, loose for small n (at 1 x 1 a 3 x 3
  convolution is just its centre tap), which is why small axes are kept exact;
- overlap: the axis's taps are folded into the input channels, at the price of
  sqrt(most (output, tap) pairs reading one input) (about 1.4x for a random 3-tap axis).
A layer left without spatial axes (a linear layer, a 1 x 1 convolution, a fully folded one) is a
matrix: its Gram matrix, or, over budget, a deflated Frobenius bound (deflated_bound). A
transposed convolution is bounded as the convolution it is the adjoint of; groups are a block
diagonal (the max over groups); a folded BatchNorm is already in the weight the caller passes.

The upper bound is proven: each block's largest eigenvalue is bounded by a Cholesky test with
Rump's rounding margins (psd_bound). The lower value is the Rayleigh quotient ||A z|| / ||z|| of
an explicit input z (the top eigenvector, or a windowed plane wave at the worst frequency;
conv_lower), so lower <= ||A|| <= upper. The computations run on torch's threads, as the rest
of the audit does: the rounding margins hold for any summation order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..ir import all_finite
from .conv_geometry import Axis, conv_axes
from .conv_gram import gram_blocks
from .conv_lower import lower_estimate
from .conv_plans import Folded, Plan, Problem, allocate, choose_plan, fold
from .deflated_bound import deflated_norm_bound
from .psd_bound import UNIT_ROUNDOFF, certified_top_eigenvalue

# Rough float64 operations one layer (DEFAULT_BUDGET) or a whole model (DEFAULT_MODEL_BUDGET)
# may spend; beyond it, cheaper plans (still proven upper bounds, looser) are used.
DEFAULT_BUDGET = 2e9
DEFAULT_MODEL_BUDGET = 1e10


@dataclass(frozen=True)
class NormBound:
    upper: float  # proven: ||A||_2 <= upper
    lower: float | None  # ||A z|| / ||z|| for a computed z: lower <= ||A||_2 up to rounding (None: not asked for)
    method: str  # how: "exact", "circulant axis 0,1", "exact axis 0 + circulant axis 1", "deflated", ...


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


# -- the bound ----------------------------------------------------------------------------------


def _problem(weight: torch.Tensor, axes: tuple[Axis, ...], groups: int) -> Problem | None:
    """Grouped weight with dead taps removed and single-tap axes factored out (None: A = 0)."""
    if any(axis.outputs == 0 for axis in axes):
        return None
    w = weight.detach().to(torch.float64)
    w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    for index, axis in enumerate(axes):
        if list(axis.taps) != list(range(w.shape[3 + index])):  # some taps only ever read padding
            w = w.index_select(3 + index, torch.tensor(axis.taps))
    kept, factor = [], 1.0
    for index, axis in reversed(list(enumerate(axes))):
        if len(axis.taps) == 1:  # B_0 has one 1 per row: ||B_0|| = sqrt(most reads of one input)
            factor *= math.sqrt(float(axis.tap_matrices()[0].sum(0).max()))
            w = w.squeeze(3 + index)
        else:
            kept.insert(0, axis)
    if not bool(w.any()):
        return None
    return Problem(w, tuple(kept), factor)


# Frequencies tried along overlap axes for the lower estimate (the plan has no worst one there).
_COARSE = (0.0, math.pi, math.pi / 2)  # in the order they are tried when few can be


def _execute(problem: Problem | None, plan: Plan | None, seed: int, want_lower: bool = True) -> NormBound:
    if problem is None or plan is None:
        return NormBound(0.0, 0.0, "zero")
    return _execute_plan(problem, plan, seed, want_lower)


def _execute_plan(problem: Problem, plan: Plan, seed: int, want_lower: bool) -> NormBound:
    """The proven upper bound, and (`want_lower`) the explicit input's lower value, which on
    circulant and overlap plans costs a search of its own."""
    folded = fold(problem, plan.kinds)
    factor = folded.factor * problem.factor
    lower: float | None
    if plan.deflated:
        upper, lower = deflated_norm_bound(folded.weight, seed=seed)
        upper *= factor * (1 + 4 * UNIT_ROUNDOFF)
        if problem.axes:  # the folded matrix's norm is no lower bound for the convolution's
            group = int(problem.weight.flatten(1).norm(dim=1).argmax())
            lower = _lower(problem, plan, folded, (), group, torch.zeros(0)) if want_lower else None
        return NormBound(upper, _capped(lower, problem.factor, upper), plan.method)
    blocks = gram_blocks(folded.weight, folded.axes, folded.exact, folded.periods, folded.side)
    top = certified_top_eigenvalue(blocks.matrices, blocks.errors, seed=seed)
    upper = math.sqrt(top.upper) * factor * (1 + 8 * UNIT_ROUNDOFF)
    group, frequency = divmod(top.index, len(blocks.frequencies))
    if all(k == "exact" for k in plan.kinds):
        lower = math.sqrt(max(top.estimate, 0.0))
    elif want_lower:
        lower = _lower(problem, plan, folded, blocks.frequencies[frequency], group, top.vector)
    else:
        lower = None
    return NormBound(upper, _capped(lower, problem.factor, upper), plan.method)


def _capped(lower: float | None, factor: float, upper: float) -> float | None:
    return None if lower is None else min(lower * factor, upper)


def _lower(problem: Problem, plan: Plan, folded: Folded, frequency: tuple[int, ...], group: int,
           vector: torch.Tensor) -> float:  # fmt: skip
    """The windowed-plane-wave estimate on the true axes: circulant axes at the certified worst
    frequency, overlap axes at a few coarse ones."""
    exact = tuple(k == "exact" for k in plan.kinds)
    periods = [p for p, e in zip(folded.periods, folded.exact) if not e]  # the circulant axes, in order
    per_axis: list[tuple[float, ...]] = []
    circulant = iter(range(len(periods)))
    for kind in plan.kinds:
        if kind == "circulant":
            index = next(circulant)
            per_axis.append((2 * math.pi * frequency[index] / periods[index],))
        elif kind == "overlap":
            per_axis.append(_COARSE)
    candidates = list(itertools.product(*per_axis))
    same_layout = "overlap" not in plan.kinds
    start = vector if same_layout else None
    side = folded.side if same_layout else _natural_side(problem, exact)
    return lower_estimate(problem.weight[group], problem.axes, exact, candidates, side, start)


def _natural_side(problem: Problem, exact: tuple[bool, ...]) -> str:
    out, inp = problem.weight.shape[1:3]
    in_size = inp * math.prod(a.size if e else a.stride for a, e in zip(problem.axes, exact))
    out_size = out * math.prod(a.outputs if e else 1 for a, e in zip(problem.axes, exact))
    return "input" if in_size < out_size else "output"


def _finite(weight: torch.Tensor) -> torch.Tensor:
    weight = weight.detach()
    if not all_finite(weight):
        raise InputError(f"a weight of shape {tuple(weight.shape)} has non-finite entries: no norm to bound")
    return weight


def _linear_problem(weight: torch.Tensor) -> Problem | None:
    matrix = _finite(weight).to(torch.float64).reshape(weight.shape[0], -1)
    return Problem(matrix.view(1, *matrix.shape), (), 1.0) if bool(matrix.any()) else None


def _conv_problem(weight: torch.Tensor, input_size: Sequence[int], stride: Any, padding: Any, dilation: Any,
                  groups: int, transposed: bool, output_padding: Any, padding_mode: str) -> Problem | None:  # fmt: skip
    weight = _finite(weight)
    if weight.dim() < 3:
        raise InputError(f"a convolution weight needs spatial axes, got shape {tuple(weight.shape)}")
    groups = int(groups or 1)
    if groups < 1 or weight.shape[0] % groups:
        raise InputError(f"{weight.shape[0]} channels do not split into {groups} groups")
    axes = conv_axes(weight.shape[2:], [int(n) for n in input_size], stride, padding, dilation,
                     transposed=transposed, output_padding=output_padding, padding_mode=padding_mode)  # fmt: skip
    return _problem(weight, axes, groups)


def linear_operator_norm(weight: torch.Tensor, *, budget: float = DEFAULT_BUDGET, seed: int = 0) -> NormBound:
    """||W||_2 of a (out, in) matrix (or any weight flattened to out x rest), proven from above:
    from its Gram matrix, or, when that costs more than `budget`, by deflation (deflated_bound)."""
    problem = _linear_problem(weight)
    return _execute(problem, choose_plan(problem, "auto", budget) if problem else None, seed)


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
    problem = _conv_problem(weight, input_size, stride, padding, dilation, groups, transposed, output_padding,
                            padding_mode)  # fmt: skip
    return _execute(problem, choose_plan(problem, plan, budget) if problem else None, seed)


def _spec_problem(spec: LayerSpec) -> Problem | None:
    if spec.input_size is None:
        return _linear_problem(spec.weight)
    return _conv_problem(spec.weight, spec.input_size, spec.stride, spec.padding, spec.dilation, spec.groups,
                         spec.transposed, spec.output_padding, spec.padding_mode)  # fmt: skip


def operator_norms(
    layers: Sequence[LayerSpec], *, budget: float = DEFAULT_MODEL_BUDGET, lower: bool = True
) -> list[NormBound]:
    """Bounds for many layers sharing one `budget` of float64 operations (conv_plans.allocate:
    the tightest plans it affords, where they save the most). A weight seen twice at the same
    geometry is computed once; every layer is seeded alike, so results do not depend on order.
    `lower=False`: upper bounds only (the audit's case), lower values None where they would
    need a search of their own."""
    keys = [_key(spec) for spec in layers]
    unique = list(dict.fromkeys(keys))
    specs = dict(zip(keys, layers))
    problems = {key: _spec_problem(specs[key]) for key in unique}
    live = [key for key in unique if problems[key] is not None]
    plans = dict(zip(live, allocate([problems[key] for key in live], budget)))
    results = {key: _execute(problems[key], plans.get(key), 0, lower) for key in unique}
    return [results[key] for key in keys]


def _key(spec: LayerSpec) -> tuple[Any, ...]:
    weight = spec.weight
    return (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, spec.input_size, str(spec.stride),
            str(spec.padding), str(spec.dilation), spec.groups, spec.transposed, str(spec.output_padding),
            spec.padding_mode)  # fmt: skip
