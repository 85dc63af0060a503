"""Numerical self-check: every claimed chain must leave the model's output unchanged
under a random weight scale shift (science.md s.1)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import describe
from ..ir import Graph
from .structure import Chain
from .weights import shift_layers

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}


@dataclass
class Verification:
    verified: dict[int, bool | None]  # chain id -> result (None: could not be checked)
    max_relative_error: float | None
    note: str = ""


def random_log10_factors(count: int, rng: random.Random, decades: float = 1.0) -> list[float]:
    """log10 g_l uniform in [-decades, decades], recentred so that prod g_l = 1."""
    draws = [rng.uniform(-decades, decades) for _ in range(count)]
    mean = sum(draws) / count
    return [d - mean for d in draws]


def relative_error(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    scale = max((float(t.abs().max()) for t in reference if t.numel()), default=0.0)
    diff = max((float((a - b).abs().max()) for a, b in zip(reference, other) if a.numel()), default=0.0)
    if scale == 0.0:
        return diff
    return diff / scale


def verify_chains(graph: Graph, chains: list[Chain], seed: int = 0) -> Verification:
    """Shift every multi-layer chain at once (one forward pass); on failure, test each alone."""
    if graph.runner is None:
        return Verification({c.id: None for c in chains}, None, "no example input: chains not verified")
    tolerance = TOLERANCE.get(graph.runner_dtype, 1e-3)
    rng = random.Random(seed)
    shifts = {
        chain.id: shift_layers(chain.layers, random_log10_factors(len(chain.layers), rng), graph.tensors)
        for chain in chains
        if len(chain.layers) > 1
    }
    result: dict[int, bool | None] = {chain.id: True for chain in chains}  # one layer: shift is identity
    if not shifts:
        return Verification(result, 0.0, "")
    try:
        reference = graph.runner({})
        combined = {key: value for overrides in shifts.values() for key, value in overrides.items()}
        error = relative_error(reference, graph.runner(combined))
        if error > tolerance:  # some claim is false: find which chains
            for chain_id, overrides in shifts.items():
                result[chain_id] = relative_error(reference, graph.runner(overrides)) <= tolerance
        return Verification(result, error, _dtype_note(graph))
    except Exception as error:
        return Verification({c.id: None for c in chains}, None, f"verification could not run: {describe(error)}")


def _dtype_note(graph: Graph) -> str:
    if graph.runner_dtype == torch.float64:
        return ""
    return f"checked in {str(graph.runner_dtype).replace('torch.', '')} (model does not run in float64)"
