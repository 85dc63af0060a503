"""Norms in log space: per layer, per chain, per residual block, and for the whole model."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..ir import Graph, all_finite
from ..ops import Role, overlap_factor, spec_of
from .conv_geometry import axis_pads, per_axis
from .structure import Chain, ResidualBlock, Structure, WeightLayer
from .weights import EffectiveWeight, effective_weight, fold_is_finite, layer_tensor_keys

NEG_INF = float("-inf")


# A layer's weight status: its numbers are meaningful, it is all zeros, or it holds NaN/Inf.
OK, ZERO, NON_FINITE = "ok", "zero", "non_finite"


@dataclass
class LayerNorms:
    frobenius: float  # NaN when the layer is not finite
    spectral: float | None
    bias_norm: float | None
    parameters: int
    log10_frobenius: float  # -inf for an all-zero weight, NaN for a non-finite one
    log10_operator_factor: float  # log10 of the conv overlap factor sqrt(prod ceil(k/s))
    status: str = OK


def _log10(value: float) -> float:
    """log10, with log10(0) = -inf and NaN kept NaN (never shown as -inf, as if it were zero)."""
    if math.isnan(value):
        return math.nan
    return math.log10(value) if value > 0 else NEG_INF


def log10_sum_exp10(values: list[float]) -> float:
    """log10(sum 10^v) without overflow; NaN when any value is NaN."""
    if any(math.isnan(v) for v in values):
        return math.nan
    finite = [v for v in values if v != NEG_INF]
    if not finite:
        return NEG_INF
    top = max(finite)
    return top + math.log10(sum(10.0 ** (v - top) for v in finite))


def _kernel_matrices(layer: WeightLayer, weight: torch.Tensor) -> torch.Tensor:
    """(groups, rows, cols): the blocks whose largest singular value is the layer's spectral norm."""
    if layer.op == "linear":
        return weight.reshape(1, weight.shape[0], -1)
    groups = int(layer.attrs.get("groups", 1) or 1)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


# Below this many rows (or columns) a power iteration runs on the Gram matrix: one GEMM, then
# cheap iterations on a small matrix that stays in cache, instead of 2 * iterations matrix-vector
# passes over the whole weight (memory-bound). Same iterates up to rounding, so same results.
GRAM_MAX_SIDE = 512


def spectral_norms(matrices: list[torch.Tensor], iterations: int = 50, tol: float = 1e-7) -> list[float]:
    """Largest singular value of each (groups, m, n) stack, by batched power iteration.

    Matrices of one shape run together; a stack's value is the max over its groups.
    Power iteration converges from below: this is an estimate, never above the truth.
    """
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, matrix in enumerate(matrices):
        by_shape[tuple(matrix.shape[1:])].append(index)
    result = [0.0] * len(matrices)
    generator = torch.Generator().manual_seed(0)
    for (rows, cols), indices in by_shape.items():
        parts = [matrices[i] for i in indices]
        count, dtype = sum(part.shape[0] for part in parts), parts[0].dtype
        vector = torch.ones(count, cols, 1, dtype=dtype)
        vector += 0.1 * torch.randn(vector.shape, generator=generator, dtype=dtype)
        if min(rows, cols) <= GRAM_MAX_SIDE:
            sigma = _power_iteration_gram(parts, vector, iterations, tol)
        else:
            stack = parts[0] if len(parts) == 1 else torch.cat(parts)  # (sum groups, m, n)
            sigma = _power_iteration(stack, vector, iterations, tol)
        offset = 0
        for i in indices:
            groups = matrices[i].shape[0]
            result[i] = float(sigma[offset : offset + groups].max())
            offset += groups
    return result


def _converged(sigma: torch.Tensor, previous: torch.Tensor, tol: float) -> bool:
    return bool(torch.all((sigma - previous).abs() <= tol * sigma.clamp_min(1e-300)))


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _matmul(stack: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """torch.bmm, but one BLAS call per matrix when the matrices are large: on CPU a batched
    matrix-vector bmm is up to 10x slower than a loop over the batch (seen with torch 2.14)."""
    if stack.shape[0] == 1 or stack.shape[1] * stack.shape[2] < 16384:
        return torch.bmm(stack, vectors)
    return torch.stack([matrix @ vector for matrix, vector in zip(stack, vectors)])


def _power_iteration(stack: torch.Tensor, vector: torch.Tensor, iterations: int, tol: float) -> torch.Tensor:
    """sigma_k = ||A v_k|| with v_{k+1} = A^T A v_k / ||.||: two passes over A per step."""
    previous = torch.zeros(stack.shape[0], dtype=stack.dtype)
    sigma = previous
    for _ in range(iterations):
        vector = _unit(vector)
        image = _matmul(stack, vector)
        sigma = image.norm(dim=(1, 2))
        vector = _matmul(stack.transpose(1, 2), image)
        if _converged(sigma, previous, tol):
            break
        previous = sigma
    return sigma


def _power_iteration_gram(parts: list[torch.Tensor], vector: torch.Tensor, iterations: int, tol: float) -> torch.Tensor:
    """The iterates of `_power_iteration` on the stack of `parts` (each (groups, m, n), one shape),
    computed on the smaller Gram matrices, formed part by part (no copy of the weights).

    Column side (cols <= rows): G = A^T A, sigma_k = sqrt(v_k^T G v_k). Row side: track
    u_k = A v_k with H = A A^T; ||v_{k+1}||^2 = u_k^T H u_k normalises the next u.
    """
    previous = torch.zeros(vector.shape[0], dtype=vector.dtype)
    sigma = previous
    vector = _unit(vector)
    rows, cols = parts[0].shape[1:]
    if cols <= rows:
        gram = torch.cat([torch.bmm(part.transpose(1, 2), part) for part in parts])
        for _ in range(iterations):
            product = _matmul(gram, vector)
            sigma = (vector * product).sum(dim=(1, 2)).clamp_min(0.0).sqrt()
            if _converged(sigma, previous, tol):
                break
            previous = sigma
            vector = _unit(product)
        return sigma
    gram = torch.cat([torch.bmm(part, part.transpose(1, 2)) for part in parts])
    starts = torch.split(vector, [part.shape[0] for part in parts])
    image = torch.cat([_matmul(part, start) for part, start in zip(parts, starts)])  # A v_0, ||v_0|| = 1
    for _ in range(iterations):
        sigma = image.norm(dim=(1, 2))
        product = _matmul(gram, image)
        if _converged(sigma, previous, tol):
            break
        previous = sigma
        next_norm = (image * product).sum(dim=(1, 2)).clamp_min(1e-300).sqrt()
        image = product / next_norm.view(-1, 1, 1)
    return sigma


def operator_factor(layer: WeightLayer, weight: torch.Tensor) -> float:
    """||conv operator|| <= sqrt(max outputs reading one input) * ||K||: that square root, times
    the norm bound of a non-zero padding mode (the padded copy repeats border inputs)."""
    if layer.op == "linear":
        return 1.0
    factor = overlap_factor(weight.shape[2:], layer.attrs.get("stride", 1), layer.attrs.get("dilation", 1))
    mode = layer.attrs.get("padding_mode") or "zeros"
    if mode == "zeros":
        return factor
    kernel = list(weight.shape[2:])
    dilations = per_axis(layer.attrs.get("dilation", 1), len(kernel), "dilation")
    pads = axis_pads(layer.attrs.get("padding", 0), kernel, dilations, len(kernel))
    return factor * padding_copies_factor(mode, pads)


def padding_copies_factor(mode: str, pads: list[tuple[int, int]]) -> float:
    """sqrt(most copies of one input in the padded input), at any input size, from the (before,
    after) pads per axis: reflect and circular padding (torch allows pad <= size) copy an input at
    most 3 times per axis, replicate padding copies an edge input up to before + after + 1 times
    (a size-1 axis)."""
    if mode == "zeros":
        return 1.0
    copies = [(before + after + 1 if mode == "replicate" else 3) if before or after else 1 for before, after in pads]
    return math.sqrt(math.prod(copies))


def layer_status(layer: WeightLayer, tensors: Mapping[str, torch.Tensor]) -> str:
    """non_finite when any tensor of the layer's effective map (BatchNorm statistics included) holds
    NaN or Inf, or the BatchNorm fold does (an eps that is NaN or leaves var + eps <= 0); zero for
    an all-zero weight; else ok."""
    if not all(all_finite(tensors[key]) for key in layer_tensor_keys(layer)):
        return NON_FINITE
    if not fold_is_finite(layer, tensors):
        return NON_FINITE
    return ZERO if not bool(tensors[layer.weight].any()) else OK


def layer_norms(
    layers: list[WeightLayer],
    tensors: Mapping[str, torch.Tensor],
    spectral: bool = True,
    effective_weights: Mapping[str, EffectiveWeight] | None = None,
) -> dict[str, LayerNorms]:
    """`effective_weights`: the layers' `effective_weight`s, when the caller has them already."""
    statuses = [layer_status(layer, tensors) for layer in layers]
    known = effective_weights or {}
    effective = [known.get(layer.name) or effective_weight(layer, tensors) for layer in layers]
    finite = [i for i, status in enumerate(statuses) if status != NON_FINITE]
    sigmas: list[float | None] = [None] * len(layers)
    if spectral and finite:
        found = spectral_norms([_kernel_matrices(layers[i], effective[i][0]) for i in finite])
        for i, sigma in zip(finite, found):
            sigmas[i] = sigma
    result: dict[str, LayerNorms] = {}
    for layer, (weight, bias), sigma, status in zip(layers, effective, sigmas, statuses):
        frobenius = float(torch.linalg.vector_norm(weight)) if status != NON_FINITE else math.nan
        bias_norm = float(torch.linalg.vector_norm(bias)) if bias is not None and status != NON_FINITE else None
        count = tensors[layer.weight].numel() + (tensors[layer.bias].numel() if layer.bias else 0)
        result[layer.name] = LayerNorms(
            frobenius=frobenius,
            spectral=sigma,
            bias_norm=bias_norm,
            parameters=int(count),
            log10_frobenius=math.nan if status == NON_FINITE else _log10(frobenius),
            log10_operator_factor=math.log10(operator_factor(layer, weight)),
            status=status,
        )
    return result


@dataclass
class ChainMetrics:
    log10_intrinsic_norm: float
    imbalance_decades: float
    log10_wd_excess: float


def chain_metrics(chain: Chain, norms: Mapping[str, LayerNorms]) -> ChainMetrics:
    logs = [norms[layer.name].log10_frobenius for layer in chain.layers]
    total = sum(logs)
    if any(math.isnan(v) for v in logs):
        return ChainMetrics(math.nan, math.nan, math.nan)
    if any(v == NEG_INF for v in logs):
        return ChainMetrics(NEG_INF, float("inf"), float("inf"))
    count = len(logs)
    # sum ||W||^2 / (L N^(2/L)), in log10.
    excess = log10_sum_exp10([2 * v for v in logs]) - math.log10(count) - 2.0 * total / count
    return ChainMetrics(total, max(logs) - min(logs), max(excess, 0.0))


def block_log10_branch_norm(block: ResidualBlock, norms: Mapping[str, LayerNorms]) -> float:
    return sum(norms[layer.name].log10_frobenius for layer in block.branch.layers)


def frobenius_lipschitz(norms: Mapping[str, LayerNorms]) -> dict[str, float]:
    """log10 of the paper's per-layer Lipschitz factor: ||W_eff||_F times the conv overlap factor."""
    return {name: n.log10_frobenius + n.log10_operator_factor for name, n in norms.items()}


def log10_input_gradient_bound(
    graph: Graph,
    structure: Structure,
    norms: Mapping[str, LayerNorms],
    layer_lipschitz: Mapping[str, float] | None = None,
    node_lipschitz: Mapping[str, float] | None = None,
) -> tuple[float | None, str]:
    """log10 of a Lipschitz bound on the model, propagated through the graph (science.md s.5).

    Weight layers contribute `layer_lipschitz` (log10; default ||W_eff||_F times the conv overlap
    factor, the paper's bound); other nodes their op's constant, or `node_lipschitz` (log10, by
    node name) where the caller knows a tighter one; joins add, concats add in quadrature. Reduces to prod ||W|| for a
    plain chain and to ||W_in|| ||W_out|| prod (||s_b|| + prod ||V||) for a residual net. Returns
    (None, why) when some op on the way has no known Lipschitz constant.
    """
    broken = [layer.name for layer in structure.layers if norms[layer.name].status == NON_FINITE]
    if broken:
        return None, f"non-finite weights in '{broken[0]}'"
    lipschitz = layer_lipschitz if layer_lipschitz is not None else frobenius_lipschitz(norms)
    layer_at = {layer.node: layer for layer in structure.layers}
    folded = {layer.bn.node for layer in structure.layers if layer.bn is not None}
    bound: dict[str, float | None] = {}
    first_unbounded = ""
    for node in graph.nodes.values():
        if node.op == "input":
            bound[node.name] = 0.0
            continue
        if node.op in ("shape", "constant"):
            continue
        inputs = [bound.get(name) for name in node.inputs]
        if any(v is None for v in inputs) or not inputs:
            bound[node.name] = None
            continue
        spec = spec_of(node.op)
        if node.name in layer_at:
            layer = layer_at[node.name]
            lip = lipschitz.get(layer.name)
            bound[node.name] = None if lip is None else inputs[0] + lip
        elif node.name in folded:
            bound[node.name] = inputs[0]
        elif node_lipschitz is not None and node.name in node_lipschitz and len(inputs) == 1:
            bound[node.name] = inputs[0] + node_lipschitz[node.name]
        elif node.op in ("add", "sub"):
            bound[node.name] = log10_sum_exp10(inputs)
        elif node.op in ("cat", "output"):
            bound[node.name] = 0.5 * log10_sum_exp10([2 * v for v in inputs])
        elif node.op in ("linear", "conv", "conv_transpose") and "weight" in node.params:
            weight = graph.tensors[node.params["weight"]].double()
            bound[node.name] = (
                inputs[0]
                + _log10(float(weight.norm()))
                + (0.0 if node.op == "linear" else math.log10(math.sqrt(math.prod(weight.shape[2:]))))
            )
        elif node.op == "split":
            bound[node.name] = inputs[0]
        elif node.op in ("scale_param", "prelu"):
            key = node.params.get("scale") or node.params.get("weight")
            inverse = node.params.get("inverse_scale")
            if inverse is not None:
                smallest = float(graph.tensors[inverse].abs().min())
                bound[node.name] = inputs[0] - _log10(smallest) if smallest > 0 else None
            elif key is not None:
                largest = float(graph.tensors[key].abs().max())
                if node.op == "prelu":
                    largest = max(largest, 1.0)
                bound[node.name] = inputs[0] + _log10(largest)
            else:
                bound[node.name] = None
        elif node.op == "batch_norm" and all(r in node.params for r in ("weight", "running_var")):
            gamma = graph.tensors[node.params["weight"]].double()
            var = graph.tensors[node.params["running_var"]].double()
            scale = float((gamma / torch.sqrt(var + float(node.attrs.get("eps", 1e-5)))).abs().max())
            bound[node.name] = inputs[0] + _log10(scale)
        elif spec is not None and spec.role in (Role.HOMOGENEOUS, Role.BARRIER) and len(inputs) == 1:
            lip = spec.lipschitz_of(node.attrs)
            bound[node.name] = None if lip is None else inputs[0] + _log10(lip)
        else:
            bound[node.name] = None
        if bound[node.name] is None and not first_unbounded:
            first_unbounded = node.name
    outputs = [bound.get(node.name) for node in graph.outputs()]
    if not outputs or any(v is None for v in outputs):
        culprit = graph.nodes[first_unbounded] if first_unbounded else None
        if culprit is None:
            return None, "no output depends on an input"
        return None, f"no Lipschitz bound through '{culprit.label}' ({culprit.op})"
    total = 0.5 * log10_sum_exp10([2 * v for v in outputs])
    if math.isnan(total):
        return None, "non-finite values on the way (a parameter outside the weight layers)"
    return total, ""


def log10_path2_norm(graph: Graph, structure: Structure) -> float | None:
    """Path-2 norm of a model that is one plain chain of Linear layers, else None.

    sqrt(1^T |W_L|^2 ... |W_1|^2 1): one forward pass of squared weights on an all-ones input.
    """
    if len(structure.chains) != 1 or any(s.status.value in ("barrier", "unknown") for s in structure.statuses.values()):
        return None
    if any(layer_status(layer, graph.tensors) == NON_FINITE for layer in structure.chains[0].layers):
        return None
    chain = structure.chains[0]
    if any(layer.op != "linear" for layer in chain.layers) or len(graph.inputs()) != 1:
        return None
    # Only elementwise ops between layers (a reshape there would mix the path structure).
    first = chain.layers[0].node
    before = set(_ancestors(graph, first))
    for node in graph.nodes.values():
        if node.name in before:
            allowed = _PATH2_BEFORE
        else:
            allowed = _PATH2_BETWEEN
        if node.op not in allowed and node.name not in {layer.node for layer in chain.layers}:
            if not (node.op == "batch_norm" and any(layer.out == node.name for layer in chain.layers)):
                return None
    vector: torch.Tensor | None = None
    log_scale = 0.0
    for layer in chain.layers:
        weight, _ = effective_weight(layer, graph.tensors)
        squared = weight.square()
        vector = squared.sum(dim=1) if vector is None else squared @ vector
        top = float(vector.max())
        if top <= 0:
            return NEG_INF
        vector = vector / top
        log_scale += math.log10(top)
    assert vector is not None
    return 0.5 * (log_scale + math.log10(float(vector.sum())))


_PATH2_BETWEEN = frozenset({"relu", "leaky_relu", "dropout", "identity", "input", "output", "shape", "constant"})
_PATH2_BEFORE = _PATH2_BETWEEN | {"flatten", "reshape"}


def _ancestors(graph: Graph, name: str) -> list[str]:
    seen: list[str] = []
    stack = list(graph.nodes[name].inputs)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.append(current)
        stack.extend(graph.nodes[current].inputs)
    return seen
