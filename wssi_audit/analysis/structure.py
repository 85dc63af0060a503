"""Node statuses, BatchNorm folding, homogeneous chains and residual blocks.

Everything here reads the internal `Graph` only; no front-end knowledge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..ir import Graph, Node
from ..ops import UNKNOWN_OPS, Role, Status, spec_of

WEIGHT_OPS = ("linear", "conv", "conv_transpose")


@dataclass
class NodeStatus:
    status: Status
    reason: str = ""


@dataclass
class FoldedBatchNorm:
    node: str
    name: str
    weight: str
    bias: str
    running_mean: str
    running_var: str
    eps: float


@dataclass
class WeightLayer:
    node: str  # the weight op's node
    name: str  # module path, e.g. "features.0"
    weight: str  # state_dict key of the weight
    bias: str | None
    kind: str  # "linear", "conv2d", "conv_transpose2d", ...
    op: str
    attrs: dict[str, Any]
    bn: FoldedBatchNorm | None = None
    out: str = ""  # node whose output is the layer's output (the folded BN when there is one)
    # Weight layers between this one and the next layer of its chain, on parallel paths that
    # split from and rejoin into the chain (Res2Net's branch convs between conv1 and conv3): their
    # input and output carry this layer's cumulative shift factor c, so under a shift their weight
    # stays and their bias (folded BatchNorm included) scales by c. Each is a one-layer chain too.
    carried: list[WeightLayer] = field(default_factory=list)


@dataclass
class Chain:
    id: int
    layers: list[WeightLayer]

    @property
    def weights(self) -> list[str]:
        return [layer.weight for layer in self.layers]


@dataclass
class ResidualBlock:
    id: int
    add_node: str
    fork: str
    branch: Chain
    # "identity" | "projection": a shortcut around the branch; "parallel": the add joins two
    # single weight layers reading the same input (RepVGG's 3x3 + 1x1), neither a shortcut
    shortcut: str
    projection: WeightLayer | None  # the other weight layer for "projection" and "parallel"
    shortcut_ops: list[str] = field(default_factory=list)


@dataclass
class Structure:
    statuses: dict[str, NodeStatus]
    layers: list[WeightLayer]
    chains: list[Chain]
    blocks: list[ResidualBlock]
    consumers: dict[str, list[str]]


def _layer_kind(node: Node, graph: Graph) -> str:
    if node.op == "linear":
        return "linear"
    weight = graph.tensors.get(node.params.get("weight", ""))
    dims = (weight.dim() - 2) if weight is not None else 2
    return f"{node.op}{dims}d"


def _layer_name(node: Node) -> str:
    weight = node.params["weight"]
    return weight[: -len(".weight")] if weight.endswith(".weight") else (node.scope or weight)


def classify_nodes(
    graph: Graph, consumers: dict[str, list[str]] | None = None
) -> tuple[dict[str, NodeStatus], dict[str, WeightLayer]]:
    """Status of every node, and the weight layers (BatchNorm folded) keyed by weight node."""
    uses: dict[str, int] = {}
    for node in graph.nodes.values():
        for key in node.params.values():
            uses[key] = uses.get(key, 0) + 1
    consumers = graph.consumers() if consumers is None else consumers
    statuses: dict[str, NodeStatus] = {}
    layers: dict[str, WeightLayer] = {}

    for node in graph.nodes.values():
        spec = spec_of(node.op)
        if spec is None:
            statuses[node.name] = NodeStatus(Status.UNKNOWN, f"op '{node.source or node.op}' is not in the op table")
        elif node.op in UNKNOWN_OPS:
            statuses[node.name] = NodeStatus(Status.UNKNOWN, spec.reason)
        elif spec.role is Role.WEIGHT:
            weight = node.params.get("weight")
            if weight is None or weight not in graph.tensors or len(node.inputs) != 1:
                statuses[node.name] = NodeStatus(Status.BARRIER, "weight is computed at run time, not a parameter")
            elif uses[weight] > 1:
                statuses[node.name] = NodeStatus(
                    Status.BARRIER, f"tied weight: '{weight}' is used by {uses[weight]} ops"
                )
            else:
                statuses[node.name] = NodeStatus(Status.WEIGHT)
                layers[node.name] = WeightLayer(
                    node=node.name,
                    name=_layer_name(node),
                    weight=weight,
                    bias=node.params.get("bias"),
                    kind=_layer_kind(node, graph),
                    op=node.op,
                    attrs=dict(node.attrs),
                    out=node.name,
                )
        elif spec.role in (Role.HOMOGENEOUS, Role.JOIN):
            statuses[node.name] = NodeStatus(Status.HOMOGENEOUS)
        elif spec.role is Role.BATCH_NORM:
            statuses[node.name] = NodeStatus(Status.BARRIER, spec_of("batch_norm_unfoldable").reason)
        elif spec.role is Role.BARRIER:
            statuses[node.name] = NodeStatus(Status.BARRIER, spec.reason)
        else:
            statuses[node.name] = NodeStatus(Status.STRUCTURAL)

    # Fold eval-mode BatchNorm into the weight layer that alone feeds it, directly or through
    # views that keep its features as BatchNorm's channels (LeViT: Linear -> flatten -> BatchNorm1d).
    for node in graph.nodes.values():
        if node.op != "batch_norm" or len(node.inputs) != 1:
            continue
        producer = _producer_through_views(graph, consumers, layers, node)
        needed = ("weight", "bias", "running_mean", "running_var")
        if producer is None:
            continue
        if not all(role in node.params for role in needed) or any(uses[node.params[r]] > 1 for r in needed):
            statuses[node.name] = NodeStatus(Status.BARRIER, "BatchNorm without affine parameters or with shared ones")
            continue
        producer.bn = FoldedBatchNorm(
            node=node.name,
            name=node.params["weight"].rsplit(".", 1)[0],
            weight=node.params["weight"],
            bias=node.params["bias"],
            running_mean=node.params["running_mean"],
            running_var=node.params["running_var"],
            eps=float(node.attrs.get("eps", 1e-5)),
        )
        producer.out = node.name
        statuses[node.name] = NodeStatus(Status.WEIGHT, f"folded into {producer.name}")
    return statuses, layers


# Views that keep the row-major order of the entries (a permutation does not).
_ORDER_PRESERVING_VIEWS = ("flatten", "reshape")


def _producer_through_views(
    graph: Graph, consumers: dict[str, list[str]], layers: dict[str, WeightLayer], bn: Node
) -> WeightLayer | None:
    """The weight layer whose output alone reaches `bn`, directly or through order-preserving
    views after which BatchNorm's channel axis (dim 1) is exactly the layer's feature axis."""
    current, reader = bn.inputs[0], bn.name
    while current not in layers:
        node = graph.nodes[current]
        if node.op not in _ORDER_PRESERVING_VIEWS or len(node.inputs) != 1 or consumers[current] != [reader]:
            return None
        current, reader = node.inputs[0], current
    producer = layers[current]
    if consumers[producer.node] != [reader]:
        return None
    if reader != bn.name and not _features_are_channels(graph, producer, graph.nodes[bn.inputs[0]]):
        return None
    return producer


def _features_are_channels(graph: Graph, layer: WeightLayer, bn_input: Node) -> bool:
    """In row-major order, an entry's feature index in the layer's output (last axis for Linear,
    axis 1 for a convolution) equals its channel index in BatchNorm's input (axis 1) exactly when
    both have the same feature count and the same number of entries after that axis."""
    produced = graph.nodes[layer.node].attrs.get("out_shape")
    seen = bn_input.attrs.get("out_shape")
    if not produced or not seen or len(seen) < 2:
        return False
    axis = len(produced) - 1 if layer.op == "linear" else 1
    inner = math.prod(produced[axis + 1 :])
    return produced[axis] == seen[1] and math.prod(seen[2:]) == inner


def _is_unary_homogeneous(node: Node) -> bool:
    spec = spec_of(node.op)
    return spec is not None and spec.role is Role.HOMOGENEOUS and len(node.inputs) == 1 and node.op != "split"


def _next_layer(
    graph: Graph, consumers: dict[str, list[str]], layers: dict[str, WeightLayer], start: str
) -> WeightLayer | None:
    """The weight layer reached from `start` through single-consumer degree-1 ops, if any."""
    current = start
    while True:
        readers = consumers[current]
        if len(readers) != 1:
            return None
        node = graph.nodes[readers[0]]
        if node.name in layers:
            return layers[node.name]
        if not _is_unary_homogeneous(node):
            return None
        current = node.name


def _walk_back(graph: Graph, consumers: dict[str, list[str]], start: str) -> tuple[str, list[str]]:
    """Walk up from `start` through degree-1 unary ops with one reader; (stop node, ops passed)."""
    current, passed = start, []
    while True:
        node = graph.nodes[current]
        if len(consumers[current]) != 1 or not _is_unary_homogeneous(node):
            return current, passed
        passed.append(current)
        current = node.inputs[0]


def find_structure(graph: Graph) -> Structure:
    consumers = graph.consumers()
    statuses, layers = classify_nodes(graph, consumers)
    successor: dict[str, WeightLayer] = {}
    has_predecessor: set[str] = set()
    for layer in layers.values():
        nxt = _next_layer(graph, consumers, layers, layer.out)
        if nxt is not None:
            successor[layer.node] = nxt
            has_predecessor.add(nxt.node)
    _link_through_regions(graph, consumers, statuses, layers, successor, has_predecessor)

    chains: list[Chain] = []
    for layer in layers.values():  # graph order, so chain ids follow the forward pass
        if layer.node in has_predecessor:
            continue
        members = [layer]
        while members[-1].node in successor:
            members.append(successor[members[-1].node])
        chains.append(Chain(len(chains), members))
    chain_by_last = {chain.layers[-1].node: chain for chain in chains}
    out_to_layer = {layer.out: layer for layer in layers.values()}

    blocks: list[ResidualBlock] = []
    for node in graph.nodes.values():
        if node.op != "add" or len(node.inputs) != 2 or node.inputs[0] == node.inputs[1]:
            continue
        for branch_in, shortcut_in in (node.inputs, node.inputs[::-1]):
            block = _match_block(graph, consumers, out_to_layer, chain_by_last, node, branch_in, shortcut_in)
            if block is not None:
                block.id = len(blocks)
                blocks.append(block)
                break
    return Structure(statuses, list(layers.values()), chains, blocks, consumers)


def _link_through_regions(
    graph: Graph,
    consumers: dict[str, list[str]],
    statuses: dict[str, NodeStatus],
    layers: dict[str, WeightLayer],
    successor: dict[str, WeightLayer],
    has_predecessor: set[str],
) -> None:
    """Chain links through split / add / cat regions (Res2Net), carrying the parallel layers.

    Layers are tried last to first, so that a block's own chain (conv1 -> conv3) is found before
    the layer feeding the block could take the block's layers as carried ones: a layer already
    in a chain of 2+ is never carried.
    """
    order = {name: index for index, name in enumerate(graph.nodes)}
    carried: set[str] = set()

    def free(layer: WeightLayer) -> bool:
        return layer.node not in successor and layer.node not in has_predecessor and layer.node not in carried

    for layer in reversed(list(layers.values())):
        if layer.node in successor or layer.node in carried:
            continue
        found = _region_exit(graph, consumers, statuses, layers, order, layer, free)
        if found is None:
            continue
        nxt, riders = found
        successor[layer.node] = nxt
        has_predecessor.add(nxt.node)
        layer.carried = riders
        carried.update(rider.node for rider in riders)


def _region_exit(
    graph: Graph,
    consumers: dict[str, list[str]],
    statuses: dict[str, NodeStatus],
    layers: dict[str, WeightLayer],
    order: dict[str, int],
    layer: WeightLayer,
    free: Any,
) -> tuple[WeightLayer, list[WeightLayer]] | None:
    """The next chain layer after `layer` through a region of degree-1 ops, splits and joins, and
    the weight layers on its parallel paths; None unless every path from `layer`'s output meets
    again in one weight layer, nothing else reads the region, and every join reads the region only
    (so that all its inputs carry the same scale)."""
    inside = {layer.out}
    pending = set(consumers[layer.out])
    riders: list[WeightLayer] = []
    while pending:
        if len(pending) == 1 and next(iter(pending)) in layers:
            nxt = layers[next(iter(pending))]
            return (nxt, riders) if free(nxt) else None
        name = min(pending, key=order.__getitem__)
        pending.discard(name)
        node = graph.nodes[name]
        if any(source not in inside for source in node.inputs):
            return None  # reads an activation from outside the region
        if name in layers:  # a weight layer while other paths are open: carried along
            rider = layers[name]
            if not free(rider):
                return None
            inside.update(_layer_nodes(graph, rider))
            riders.append(rider)
            outputs = consumers[rider.out]
        else:
            spec = spec_of(node.op)
            if spec is None or statuses[name].status is not Status.HOMOGENEOUS:
                return None
            if spec.role is not Role.JOIN and len(node.inputs) != 1:
                return None
            inside.add(name)
            outputs = consumers[name]
        pending.update(reader for reader in outputs if reader not in inside)
    return None


def _layer_nodes(graph: Graph, layer: WeightLayer) -> list[str]:
    """The weight node, its folded BatchNorm and any views between them."""
    names, current = [layer.out], layer.out
    while current != layer.node:
        current = graph.nodes[current].inputs[0]
        names.append(current)
    return names


def _fork_of(graph: Graph, consumers: dict[str, list[str]], layer: WeightLayer) -> str:
    stop, _ = _walk_back(graph, consumers, graph.nodes[layer.node].inputs[0])
    return stop


def _match_block(
    graph: Graph,
    consumers: dict[str, list[str]],
    out_to_layer: dict[str, WeightLayer],
    chain_by_last: dict[str, Chain],
    add: Node,
    branch_in: str,
    shortcut_in: str,
) -> ResidualBlock | None:
    branch_end, _ = _walk_back(graph, consumers, branch_in)
    last = out_to_layer.get(branch_end)
    if last is None or len(consumers[branch_end]) != 1:
        return None
    chain = chain_by_last.get(last.node)
    if chain is None:
        return None
    fork = _fork_of(graph, consumers, chain.layers[0])
    if len(consumers[fork]) < 2:
        return None
    shortcut_end, shortcut_ops = _walk_back(graph, consumers, shortcut_in)
    if shortcut_end == fork:
        return ResidualBlock(0, add.name, fork, chain, "identity", None, shortcut_ops)
    projection = out_to_layer.get(shortcut_end)
    if projection is None or chain_by_last.get(projection.node) is None:
        return None
    if len(chain_by_last[projection.node].layers) != 1 or projection is last:
        return None
    if _fork_of(graph, consumers, projection) != fork:
        return None
    kind = "parallel" if len(chain.layers) == 1 else "projection"
    return ResidualBlock(0, add.name, fork, chain, kind, projection, shortcut_ops)
