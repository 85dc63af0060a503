"""The certified input-gradient bound: the graph propagation of `metrics` with each weight layer's
proven operator-norm upper bound at its traced input size (see operator_norms)."""

from __future__ import annotations

from collections.abc import Mapping

from ..ir import Graph
from .metrics import LayerNorms
from .structure import Structure


def certified_norms(
    graph: Graph, structure: Structure, norms: Mapping[str, LayerNorms]
) -> tuple[dict[str, float], float | None, str, str]:
    """(layer name -> log10 certified operator norm, log10 certified model bound, note, method)."""
    return {}, None, "not computed yet", ""
