"""Numerical self-check: every claimed chain is tested where its effect is visible, with a control.

For a chain W_1 .. W_L (science.md s.1), a weight scale shift W_l -> g_l W_l, b_l -> c_l b_l with
prod g_l = 1 must leave the chain's end (its last layer's output, BatchNorm folded) and the op right
after it exactly unchanged. Each chain is checked *locally*: its own segment of the graph runs on the
values its inputs had in one unshifted run, so a chain whose effect on the model output is tiny (or
nil) is checked just as hard as any other. Three shifts per chain: random factors (10^+-1), and two
that move every internal activation far up and far down (so that a clipping threshold such as ReLU6's
6 or hard-sigmoid's 3 is crossed for the activations actually seen).

The control: the same chain's first layer scaled by 10^0.5 *without* compensation must move the
checked tensor by far more than the tolerance; otherwise the check could not have failed and the
chain is **unverifiable** (e.g. a dead chain whose end is identically zero), never "verified".

Dtype and tolerances. Checks run in float64 where the model runs in float64 (the torch front-ends),
else in float32 (onnxruntime). A local segment is a few layers: its rounding error relative to the
tensor's largest entry is about L * sqrt(fan-in) * eps (~1e-13 in float64, ~1e-5 in float32), and
scaling by powers of ten does not change relative rounding. Tolerances 1e-9 / 1e-4 leave a margin of
10^4 / 10; the control must move the tensor by 1e-3 / 1e-2 relative (10^6 / 100 times the
tolerance). A last, global check shifts every chain at once and compares the model outputs (the whole
depth: tolerance 1e-6 / 1e-3); it guards the local machinery itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import describe
from ..ir import Graph, Node, Runner, all_finite, leaves
from ..ops import spec_of
from .structure import Chain, WeightLayer
from .weights import chain_tensor_keys, fold_is_finite, shift_layers

LOCAL_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
MIN_POWER = {torch.float64: 1e-3, torch.float32: 1e-2}
GLOBAL_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}
TOLERANCE = GLOBAL_TOLERANCE  # whole-model output comparisons (balance reuses it)
CONTROL_LOG10_FACTOR = 0.5
# Internal activations are pushed up to about this size (and down by DOWN_DECADES) to cross thresholds.
TARGET_MAGNITUDE = 1e3
DOWN_DECADES = 3.0
MAX_DECADES = {torch.float64: 8.0, torch.float32: 5.0}

VERIFIED, FAILED, UNVERIFIABLE, TRIVIAL, NOT_RUN = "verified", "failed", "unverifiable", "trivial", "not_run"


@dataclass
class ChainCheck:
    status: str  # verified | failed | unverifiable | trivial (one layer: nothing to shift) | not_run
    error: float | None = None  # largest relative change of the checked tensors under the shifts
    power: float | None = None  # relative change of the chain's end under the uncompensated control
    reason: str = ""


@dataclass
class Verification:
    chains: dict[int, ChainCheck]
    global_error: float | None = None  # all chains shifted at once, at the model outputs
    dtype: str = ""
    note: str = ""
    dead: set[str] = field(default_factory=set)  # layers whose activated output is identically zero

    @property
    def max_error(self) -> float | None:
        errors = [c.error for c in self.chains.values() if c.error is not None]
        if self.global_error is not None:
            errors.append(self.global_error)
        return max(errors) if errors else None


def random_log10_factors(count: int, rng: random.Random, decades: float = 1.0) -> list[float]:
    """log10 g_l uniform in [-decades, decades], recentred so that prod g_l = 1."""
    draws = [rng.uniform(-decades, decades) for _ in range(count)]
    mean = sum(draws) / count
    return [d - mean for d in draws]


class Reference:
    """Tensors later runs are compared with (`relative_error`), their finiteness and largest
    magnitude worked out once: a chain's three shifted runs all compare against the same values."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        present = [t for t in self.tensors if t.numel()]
        self.finite = all(all_finite(t) for t in present)
        self.scale = max((float(t.abs().max()) for t in present), default=0.0) if self.finite else math.nan

    def error(self, other: Iterable[torch.Tensor]) -> float:
        """max |a - b| / max |a| over the tensor pairs (absolute when the reference is zero); NaN when
        any value is not finite or a pair differs in shape (a NaN must never compare as "unchanged").
        Pairs as zip makes them: a longer side's extra tensors are not compared."""
        other = list(other)
        if len(other) != len(self.tensors):
            count = min(len(other), len(self.tensors))
            return Reference(self.tensors[:count]).error(other[:count])
        if not self.finite:
            return math.nan
        diff = 0.0
        for a, b in zip(self.tensors, other):
            if not a.numel():
                continue
            if a.shape != b.shape or not all_finite(b):
                return math.nan
            diff = max(diff, float((a - b).abs().max()))
        return diff / self.scale if self.scale > 0 else diff


def relative_error(reference: Iterable[torch.Tensor], other: Iterable[torch.Tensor]) -> float:
    """max |a - b| / max |a| over all tensor pairs (`Reference.error`), for a one-off comparison."""
    return Reference(reference).error(other)


def _finite(values: Iterable[torch.Tensor]) -> bool:
    return all(all_finite(t) for t in values)


def chain_segment(graph: Graph, consumers: Mapping[str, list[str]], chain: Chain) -> tuple[set[str], list[str]]:
    """(nodes from the chain's first layer to its end, the tensors checked: the end and its readers)."""
    start, end = chain.layers[0].node, chain.layers[-1].out
    forward, stack = {start}, [start]
    while stack:
        for reader in consumers.get(stack.pop(), []):
            if reader not in forward:
                forward.add(reader)
                stack.append(reader)
    backward, stack = {end}, [end]
    while stack:
        for source in graph.nodes[stack.pop()].inputs:
            if source not in backward and source in forward:
                backward.add(source)
                stack.append(source)
    inside = forward & backward
    readers = [r for r in consumers.get(end, []) if graph.nodes[r].op != "output"]
    return inside | set(readers), [end, *readers]


def _shift_plans(layers: list[WeightLayer], rng: random.Random, scale: float, dtype: torch.dtype) -> list[list[float]]:
    """log10 factors of the three compensated shifts (random, internal activations up, down)."""
    count = len(layers)
    up = math.log10(TARGET_MAGNITUDE / scale) if scale > 0 and math.isfinite(scale) else 3.0
    up = min(max(up, 1.0), MAX_DECADES[dtype])
    down = min(DOWN_DECADES, MAX_DECADES[dtype])
    return [
        random_log10_factors(count, rng),
        [up, *([0.0] * (count - 2)), -up],
        [-down, *([0.0] * (count - 2)), down],
    ]


class _ChainChecker:
    """Runs the checks of one graph; holds the unshifted values they compare against."""

    def __init__(self, graph: Graph, runner: Runner, chains: list[Chain], consumers: Mapping[str, list[str]]) -> None:
        self.graph, self.runner, self.chains = graph, runner, chains
        self.segments = {c.id: chain_segment(graph, consumers, c) for c in chains}
        capture: set[str] = set()
        for chain in chains:
            nodes, checked = self.segments[chain.id]
            capture |= runner.boundary(nodes) | set(checked) | {layer.out for layer in chain.layers[:-1]}
        self.base = runner.run({}, capture)
        self.dtype = runner.dtype

    def check(self, chain: Chain, rng: random.Random) -> ChainCheck:
        tensors = self.graph.tensors
        nonfinite = [key for key in chain_tensor_keys(chain.layers) if not _finite([tensors[key]])]
        if nonfinite:
            return ChainCheck(FAILED, reason=f"non-finite values in {nonfinite[0]}")
        folds = [layer.bn for layer in chain.layers if layer.bn and not fold_is_finite(layer, tensors)]
        if folds:
            return ChainCheck(FAILED, reason=f"non-finite values in the fold of {folds[0].name} (eps {folds[0].eps:g})")
        nodes, checked = self.segments[chain.id]
        reference = [leaves(self.base[name]) for name in checked]
        if not _finite(t for group in reference for t in group):
            return ChainCheck(UNVERIFIABLE, reason="non-finite activations reach the chain on the example input")
        interior = [t for layer in chain.layers[:-1] for t in leaves(self.base[layer.out])]
        scale = max((float(t.abs().max()) for t in interior if t.numel()), default=0.0)
        tolerance = LOCAL_TOLERANCE.get(self.dtype, 1e-4)

        references: dict[tuple[str, ...], Reference] = {}

        def change(overrides: Mapping[str, torch.Tensor], names: list[str]) -> float:
            values = self.runner.run_segment(overrides, nodes, names, self.base)
            key = tuple(names)
            if key not in references:
                references[key] = Reference(t for name in names for t in leaves(self.base[name]))
            return references[key].error([t for name in names for t in leaves(values[name])])

        errors = [
            change(shift_layers(chain.layers, factors, tensors), checked)
            for factors in _shift_plans(chain.layers, rng, scale, self.dtype)
        ]
        error = math.nan if any(math.isnan(e) for e in errors) else max(errors)
        first = chain.layers[0]
        control = shift_layers([first], [CONTROL_LOG10_FACTOR], tensors, log10_output_scale=CONTROL_LOG10_FACTOR)
        power = change(control, checked[:1])
        if math.isnan(error) or error > tolerance:
            return ChainCheck(FAILED, error, power, f"the shifted chain changed its output by {error:.2e}")
        if math.isnan(power) or power < MIN_POWER.get(self.dtype, 1e-2):
            why = (
                "its end is identically zero"
                if reference and all(not bool(t.any()) for t in reference[0])
                else (f"scaling its first layer moved its end by only {power:.1e}")
            )
            return ChainCheck(UNVERIFIABLE, error, power, f"the check has no power: {why}")
        return ChainCheck(VERIFIED, error, power)

    def dead_layers(self, chain: Chain) -> set[str]:
        """Layers of a chain whose activated output (the op reading the layer) is all zeros."""
        _, checked = self.segments[chain.id]
        return (
            {chain.layers[-1].name}
            if len(checked) > 1 and not any(bool(t.any()) for t in leaves(self.base[checked[1]]))
            else set()
        )


def verify_chains(
    graph: Graph, chains: list[Chain], seed: int = 0, consumers: Mapping[str, list[str]] | None = None
) -> Verification:
    """Check every chain of two or more layers locally, then all of them at once globally."""
    trivial = {c.id: ChainCheck(TRIVIAL, reason="one layer: no shift to check") for c in chains if len(c.layers) < 2}
    multi = [c for c in chains if len(c.layers) > 1]
    if graph.runner is None:
        checks = {c.id: ChainCheck(NOT_RUN, reason=graph.runner_note) for c in multi}
        return Verification({**trivial, **checks}, note=f"{graph.runner_note}: chains not verified")
    consumers = consumers if consumers is not None else graph.consumers()
    rng = random.Random(seed)
    try:
        checker = _ChainChecker(graph, graph.runner, multi, consumers)
        checks = {c.id: checker.check(c, rng) for c in multi}
        dead = set().union(*(checker.dead_layers(c) for c in multi)) if multi else set()
        dtype = checker.dtype
        global_error, note = _global_check(graph, multi, checker, rng)
    except Exception as error:
        checks = {c.id: ChainCheck(NOT_RUN, reason=f"could not run: {describe(error)}") for c in multi}
        return Verification({**trivial, **checks}, note=f"verification could not run: {describe(error)}")
    if dtype != torch.float64:
        note = "; ".join(filter(None, [note, f"checked in {str(dtype).replace('torch.', '')}"]))
    return Verification({**trivial, **checks}, global_error, str(dtype).replace("torch.", ""), note, dead)


def random_nodes(graph: Graph) -> list[Node]:
    """Nodes that draw random numbers at every run (dropout in training mode): two runs differ."""
    return [node for node in graph.nodes.values() if getattr(spec_of(node.op), "random", False)]


def _global_check(
    graph: Graph, chains: list[Chain], checker: _ChainChecker, rng: random.Random
) -> tuple[float | None, str]:
    """Every chain shifted at once (random factors), compared at the model outputs."""
    if not chains:
        return None, ""
    if not all(_finite([t]) for t in graph.tensors.values() if t.is_floating_point()):
        return None, "global check skipped: the model has non-finite tensors"
    drawing = random_nodes(graph)
    if drawing:  # two runs of the whole graph differ whatever the shift
        return None, f"global check skipped: {drawing[0].op} '{drawing[0].label}' draws random numbers at every run"
    combined: dict[str, torch.Tensor] = {}
    for chain in chains:
        combined.update(shift_layers(chain.layers, random_log10_factors(len(chain.layers), rng), graph.tensors))
    reference = leaves(checker.base[Runner.OUTPUT])
    error = relative_error(reference, graph.runner(combined))
    return error, ""


def global_check_failed(verification: Verification) -> bool:
    error = verification.global_error
    if error is None:
        return False
    tolerance = GLOBAL_TOLERANCE.get(getattr(torch, verification.dtype, torch.float64), 1e-3)
    return math.isnan(error) or error > tolerance
