"""The certified input-gradient bound: the graph propagation of `metrics` with each weight layer's
proven operator-norm upper bound at its traced input size (operator_norms) and each pooling
layer's exact Lipschitz constant (pool_norms), instead of the paper's Frobenius factors.

A layer whose input size the trace does not record (and a run cannot recover) keeps its
Frobenius factor: still a proven bound at any size, only looser. Such layers are named in the note.
The pooling constants (`pools`) are exact, so the Frobenius bound uses them too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..ir import Graph, Node
from .metrics import NON_FINITE, ZERO, LayerNorms, frobenius_lipschitz, log10_input_gradient_bound
from .operator_norms import LayerSpec, operator_norms
from .pool_norms import pool_lipschitz
from .structure import Structure, WeightLayer
from .weights import EffectiveWeight, effective_weight

# Ops with an exact Lipschitz constant at their traced sizes: pooling, and means over some axes.
POOL_OPS = {
    "max_pool": "max",
    "avg_pool": "avg",
    "adaptive_max_pool": "adaptive_max",
    "adaptive_avg_pool": "adaptive_avg",
    "global_avg_pool": "mean",
    "mean": "mean",
}


@dataclass
class CertifiedBound:
    layers: dict[str, float] = field(default_factory=dict)  # layer name -> log10 certified ||A||_2
    pools: dict[str, float] = field(default_factory=dict)  # pooling node -> log10 exact Lipschitz constant
    log10_bound: float | None = None
    note: str = ""
    method: str = ""


def _shape(node: Node, captured: Mapping[str, Any]) -> list[int] | None:
    shape = node.attrs.get("out_shape")
    if shape is None and node.name in captured:
        shape = list(getattr(captured[node.name], "shape", ())) or None
    if not shape or not all(isinstance(n, int) or (hasattr(n, "__index__") and not isinstance(n, bool)) for n in shape):
        return None  # unknown, or symbolic (a dynamic dimension): no size to bound at
    return [int(n) for n in shape]


def _spatial(shape: list[int] | None, dims: int) -> tuple[int, ...] | None:
    """The last `dims` sizes of an (N, C, *spatial) or unbatched (C, *spatial) shape."""
    if shape is None or dims < 1 or len(shape) < dims + 1:
        return None
    return tuple(shape[-dims:])


def _captured_shapes(graph: Graph, wanted: set[str]) -> dict[str, Any]:
    """One run of the model for the input sizes the trace did not record (ONNX, TorchScript)."""
    missing = {name for name in wanted if "out_shape" not in graph.nodes[name].attrs}
    if not missing or graph.runner is None:
        return {}
    try:
        return graph.runner.run({}, capture=missing)
    except Exception:
        return {}


def _layer_spec(
    layer: WeightLayer, graph: Graph, captured: Mapping[str, Any], weight: torch.Tensor
) -> LayerSpec | None:
    node = graph.nodes[layer.node]
    if layer.op == "linear":
        return LayerSpec(weight)
    attrs = node.attrs
    size = _spatial(_shape(graph.nodes[node.inputs[0]], captured), weight.dim() - 2) if node.inputs else None
    if size is None:
        return None
    return LayerSpec(
        weight,
        input_size=size,
        stride=attrs.get("stride", 1),
        padding=attrs.get("padding", 0),
        dilation=attrs.get("dilation", 1),
        groups=int(attrs.get("groups", 1) or 1),
        transposed=layer.op == "conv_transpose",
        output_padding=attrs.get("output_padding", 0),
        padding_mode=attrs.get("padding_mode", "zeros"),
    )


def _pool_log10(node: Node, graph: Graph, captured: Mapping[str, Any]) -> float | None:
    kind = POOL_OPS[node.op]
    attrs = node.attrs
    out_shape = _shape(node, captured)
    if kind == "mean":  # each output the mean of n inputs, disjoint: rows of 1/n, norm 1/sqrt(n)
        shape = _shape(graph.nodes[node.inputs[0]], captured) if node.inputs else None
        if not shape or not out_shape or math.prod(out_shape) == 0 or math.prod(shape) % math.prod(out_shape):
            return None
        return -0.5 * math.log10(math.prod(shape) // math.prod(out_shape))
    dims = len(attrs["kernel_size"]) if isinstance(attrs.get("kernel_size"), list) else None
    if dims is None and out_shape is not None:
        dims = len(out_shape) - 2
    if not dims or not node.inputs:
        return None
    size = _spatial(_shape(graph.nodes[node.inputs[0]], captured), dims)
    if size is None:
        return None
    # A missing count_include_pad (ONNX's default is 0, torch's True): the smaller divisors bound both.
    bound = pool_lipschitz(
        kind,
        size,
        kernel_size=attrs.get("kernel_size"),
        stride=attrs.get("stride"),
        padding=attrs.get("padding", 0),
        dilation=attrs.get("dilation", 1),
        ceil_mode=bool(attrs.get("ceil_mode", False)),
        count_include_pad=bool(attrs.get("count_include_pad", False)),
        divisor_override=attrs.get("divisor_override"),
        output_size=_spatial(out_shape, dims) if kind.startswith("adaptive") else None,
    )
    return math.log10(bound.upper) if bound.upper > 0 else -math.inf


def certified_bound(
    graph: Graph,
    structure: Structure,
    norms: Mapping[str, LayerNorms],
    effective_weights: Mapping[str, EffectiveWeight] | None = None,
) -> CertifiedBound:
    """Per-layer certified operator norms and the model's certified input-gradient bound
    (`effective_weights`: the layers' `effective_weight`s, when the caller has them already)."""
    known = effective_weights or {}
    result = CertifiedBound()
    live = [layer for layer in structure.layers if norms[layer.name].status not in (NON_FINITE, ZERO)]
    pools = [node for node in graph.nodes.values() if node.op in POOL_OPS]
    wanted = {
        graph.nodes[layer.node].inputs[0] for layer in live if layer.op != "linear" and graph.nodes[layer.node].inputs
    }
    wanted |= {node.inputs[0] for node in pools if node.inputs} | {node.name for node in pools}
    captured = _captured_shapes(graph, wanted)

    specs, unsized = {}, []
    for layer in live:
        weight = (known.get(layer.name) or effective_weight(layer, graph.tensors))[0]
        spec = _layer_spec(layer, graph, captured, weight)
        if spec is None:
            unsized.append(layer.name)
        else:
            specs[layer.name] = spec
    try:
        bounds = dict(zip(specs, operator_norms(list(specs.values()), lower=False)))
    except InputError as error:
        result.note = f"no certified norms: {error}"
        return result

    for layer in structure.layers:
        if norms[layer.name].status == ZERO:
            result.layers[layer.name] = -math.inf
        elif layer.name in bounds:
            upper = bounds[layer.name].upper
            result.layers[layer.name] = math.log10(upper) if upper > 0 else -math.inf
    lipschitz = frobenius_lipschitz(norms)
    lipschitz.update(result.layers)

    for node in pools:
        try:
            value = _pool_log10(node, graph, captured)
        except InputError:
            value = None
        if value is not None:
            result.pools[node.name] = value

    result.log10_bound, why = log10_input_gradient_bound(
        graph, structure, norms, layer_lipschitz=lipschitz, node_lipschitz=result.pools
    )
    methods = Counter(_family(bound.method) for bound in bounds.values())
    parts = [f"{count} {name}" for name, count in sorted(methods.items(), key=lambda kv: -kv[1])]
    if unsized:
        parts.append(f"{len(unsized)} Frobenius (input size not traced)")
    result.method = "operator norms at traced input sizes: " + ", ".join(parts) if parts else ""
    notes = [why] if why else []
    if unsized:
        notes.append(f"no traced input size for {', '.join(unsized[:3])}{' ...' if len(unsized) > 3 else ''}")
    result.note = "; ".join(notes)
    return result


def _family(method: str) -> str:
    """'exact axis 0 + circulant axis 1' -> 'exact+circulant': the report's method tally."""
    words = [word for word in ("exact", "circulant", "overlap", "deflated", "matrix") if word in method]
    return "+".join(words) if words else method or "zero"
