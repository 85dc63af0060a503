"""How to bound each layer: per spatial axis exact, circulant or overlap, at what cost and looseness.

Every plan gives a proven upper bound; they differ in cost and in how far above the true norm
they land. "exact" keeps the axis's positions in the matrix (tight, costly when the axis is
large). "circulant" embeds the axis in a ring (conv_gram; loses about 1/size, more with a padding
map). "overlap" folds the axis's taps into the input channels and removes the axis:
||A|| <= sqrt(most (output, tap) pairs that read one input) * ||the folded convolution||
(output j of the axis applies [W_t0 ... W_tk] to the stacked inputs it reads; stacking copies
each input at most `overlap` times). A problem left with no spatial axis is a matrix; when its
Gram matrix is over budget it can be bounded by deflation (deflated_bound), near its Frobenius
norm unless its spectrum is concentrated. Costs are rough float64 operation counts; looseness is
a ranking in rough decades, not a bound.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import InputError
from .conv_geometry import Axis
from .conv_gram import frequency_count
from .deflated_bound import deflated_cost

KINDS = ("exact", "circulant", "overlap")
DEFLATION_LOOSENESS = 1.0  # decades a deflated bound is ranked as losing: it may reach ||A||_F
# Fixed costs, in the same rough operations (about 0.1 ns each on one thread of the 2-core
# machine these were measured on): per layer (Python, geometry, small tensors), and per small
# matrix factorised in a batch (LAPACK call overhead, a few us; none for 1 x 1 blocks).
LAYER_OVERHEAD = 3e7
MATRIX_OVERHEAD = 5e4


@dataclass
class Problem:
    weight: torch.Tensor  # (groups, out, in, *kept taps per axis), float64
    axes: tuple[Axis, ...]  # the axes left after single-tap axes are factored out
    factor: float  # exact norm factor of the factored-out single-tap axes


@dataclass(frozen=True)
class Plan:
    kinds: tuple[str, ...]  # per axis of the problem
    cost: float
    looseness: float
    deflated: bool = False  # the folded matrix is bounded by deflation, not by its Gram matrix

    @property
    def method(self) -> str:
        parts = []
        if self.kinds and any(k != "exact" for k in self.kinds):
            for kind in KINDS:
                axes = [str(i) for i, k in enumerate(self.kinds) if k == kind]
                if axes:
                    parts.append(f"{kind} axis {','.join(axes)}")
        else:
            parts.append("exact")
        if self.deflated:
            parts = [p for p in parts if p != "exact"] + ["deflated"]
        return " + ".join(parts)


@dataclass
class Folded:
    """The problem a plan certifies: overlap axes folded into the input channels, and axes
    without a ring (reflect/replicate padding) replaced by a convolution of the padded input."""

    weight: torch.Tensor
    axes: tuple[Axis, ...]
    exact: tuple[bool, ...]
    periods: tuple[int, ...]  # per axis: frequencies N/s of its ring, 1 when exact
    factor: float  # sqrt(overlap) of folded axes times the padding maps' norms
    side: str  # "input": Gram blocks of A^T A; "output": of A A^T


@functools.cache
def overlap(axis: Axis) -> int:
    """Most (output, tap) pairs that read one input position of this axis (cached: a plan search
    asks it of every candidate)."""
    return int(axis.tap_matrices().sum(dim=(0, 1)).max())


def _ring(axis: Axis) -> tuple[Axis, float]:
    """The axis a circulant embedding uses, and the norm of the padding map it needed."""
    return (axis, 1.0) if axis.circulant_period() is not None else axis.padded()


def fold(problem: Problem, kinds: Sequence[str]) -> Folded:
    weight, factor = problem.weight, 1.0
    folded = [i for i, k in enumerate(kinds) if k == "overlap"]
    kept = [i for i, k in enumerate(kinds) if k != "overlap"]
    if folded:
        groups, out = weight.shape[:2]
        weight = weight.permute([0, 1, 2, *(3 + i for i in folded), *(3 + i for i in kept)])
        weight = weight.reshape(groups, out, -1, *(weight.shape[3 + len(folded) + j] for j in range(len(kept))))
        factor *= math.sqrt(math.prod(overlap(problem.axes[i]) for i in folded))
    axes, exact, periods = [], [], []
    for i in kept:
        axis = problem.axes[i]
        if kinds[i] == "exact":
            axes.append(axis)
            exact.append(True)
            periods.append(1)
            continue
        axis, padding_norm = _ring(axis)
        factor *= padding_norm
        ring = axis.circulant_period()
        assert ring is not None
        axes.append(axis)
        exact.append(False)
        periods.append(ring // axis.stride)
    out, inp = weight.shape[1:3]
    side = _side(out, inp, axes, exact)
    return Folded(weight, tuple(axes), tuple(exact), tuple(periods), factor, side)


def _side(out: int, inp: int, axes: Sequence[Axis], exact: Sequence[bool]) -> str:
    in_size = inp * math.prod(a.size if e else a.stride for a, e in zip(axes, exact))
    out_size = out * math.prod(a.outputs if e else 1 for a, e in zip(axes, exact))
    return "input" if in_size < out_size else "output"


def make_plan(problem: Problem, kinds: tuple[str, ...]) -> Plan:
    groups, out, inp = problem.weight.shape[:3]
    inp *= math.prod(len(a.taps) for a, k in zip(problem.axes, kinds) if k == "overlap")
    axes = [_ring(a)[0] if k == "circulant" else a for a, k in zip(problem.axes, kinds) if k != "overlap"]
    exact = [k == "exact" for k in kinds if k != "overlap"]
    side = _side(out, inp, axes, exact)
    channels, other = (inp, out) if side == "input" else (out, inp)
    spatial = math.prod(
        (a.size if side == "input" else a.outputs) if e else (a.stride if side == "input" else 1)
        for a, e in zip(axes, exact)
    )
    size = channels * spatial
    frequencies = frequency_count([a.circulant_period() // a.stride for a, e in zip(axes, exact) if not e])
    taps = math.prod(len(a.taps) for a in axes)
    complex_factor = 1 if all(exact) else 4
    cost = groups * (
        frequencies * complex_factor * (size**3 / 3 + 50 * size**2 + (MATRIX_OVERHEAD if size > 1 else 0))
        + frequencies * 2 * spatial**2 * channels**2 * min(taps**2, 64)
        + taps**2 * channels**2 * other
    )
    cost += LAYER_OVERHEAD + _lower_cost(problem, kinds)
    looseness = 0.0
    for axis, kind in zip(problem.axes, kinds):
        if kind == "circulant":
            looseness += 0.15 / axis.size + math.log10(_ring(axis)[1])
        elif kind == "overlap":
            looseness += 0.3 * math.log10(max(overlap(axis), 1)) + 0.01
    return Plan(kinds, cost, looseness)


def _lower_cost(problem: Problem, kinds: Sequence[str]) -> float:
    """The lower estimate's products (conv_lower): 2 windows x 2 vectors x 4 passes x (A, A^H),
    each ~ taps x out x in x the exact positions, plus the symbol screen over overlap axes."""
    if all(k == "exact" for k in kinds):
        return 0.0
    out, inp = problem.weight.shape[1:3]
    taps = math.prod(len(a.taps) for a in problem.axes)
    positions = math.prod(a.size for a, k in zip(problem.axes, kinds) if k == "exact")
    cost = 32.0 * taps * out * inp * positions
    if "overlap" in kinds and "exact" not in kinds:
        cost += 8.0 * taps * out * inp * 3 ** kinds.count("overlap")
    return cost


def candidate_plans(problem: Problem) -> list[Plan]:
    """Every treatment of the axes; plans that leave a matrix also in their deflated form."""
    plans = []
    groups, out, inp = problem.weight.shape[:3]
    for kinds in itertools.product(KINDS, repeat=len(problem.axes)):
        plan = make_plan(problem, kinds)
        plans.append(plan)
        if all(k == "overlap" for k in kinds):
            folded_in = inp * math.prod(len(a.taps) for a in problem.axes)
            cost = deflated_cost(groups, out, folded_in) + LAYER_OVERHEAD
            if cost < plan.cost:
                plans.append(replace(plan, cost=cost, looseness=plan.looseness + DEFLATION_LOOSENESS, deflated=True))
    return plans


def choose_plan(problem: Problem, mode: Any, budget: float) -> Plan:
    """The given plan, or ("auto") the least loose plan that fits the budget, else the cheapest."""
    count = len(problem.axes)
    if mode in KINDS:
        return make_plan(problem, (mode,) * count)
    if isinstance(mode, (tuple, list)) and len(mode) == count and all(k in KINDS for k in mode):
        return make_plan(problem, tuple(mode))
    if mode != "auto":
        raise InputError(f"plan {mode!r} is not 'auto', one of {', '.join(KINDS)} or one of those per axis")
    plans = candidate_plans(problem)
    affordable = [p for p in plans if p.cost <= budget]
    if not affordable:
        return min(plans, key=lambda p: p.cost)
    return min(affordable, key=lambda p: (round(p.looseness, 9), p.cost))


def allocate(problems: Sequence[Problem], budget: float) -> list[Plan]:
    """Plans for many layers sharing one budget: start from each layer's cheapest plan, then
    repeatedly take the upgrade with the largest looseness saved per extra operation that still
    fits. Deterministic (operation counts, not time)."""
    frontiers = []
    for problem in problems:
        plans = sorted(candidate_plans(problem), key=lambda p: (p.cost, p.looseness))
        frontier: list[Plan] = []
        for plan in plans:  # the Pareto front: each step costs more and is strictly tighter
            if not frontier or plan.looseness < frontier[-1].looseness - 1e-12:
                frontier.append(plan)
        frontiers.append(frontier)
    chosen = [0] * len(problems)
    remaining = budget - sum(f[0].cost for f in frontiers)
    while True:
        best, best_ratio = None, 0.0
        for index, frontier in enumerate(frontiers):
            current = frontier[chosen[index]]
            for step in range(chosen[index] + 1, len(frontier)):
                extra = frontier[step].cost - current.cost
                if extra > remaining:
                    break
                ratio = (current.looseness - frontier[step].looseness) / max(extra, 1.0)
                if ratio > best_ratio:
                    best, best_ratio = (index, step), ratio
        if best is None:
            return [f[c] for f, c in zip(frontiers, chosen)]
        index, step = best
        remaining -= frontiers[index][step].cost - frontiers[index][chosen[index]].cost
        chosen[index] = step
