"""Which layers the regularizer covers, grouped into which penalty terms, and why others are excluded.

Read from the audit's structure: a plain chain is one term, a residual block (branch plus projection
shortcut) is one term.

BatchNorm (decision): a conv/linear layer followed by a BatchNorm is covered through its *folded* norm
``||diag(gamma / sqrt(running_var + eps)) W||`` (the eval-mode map the model deploys), but the penalty's
gradient reaches only the BatchNorm's gamma (and beta, through the bias term). In train mode the raw
conv weight feeding a BatchNorm is scale-free (batch statistics divide its scale out), so a log
penalty on it would shrink it to zero at no cost to the loss; it is excluded and keeps whatever weight
decay the user gave it. The folded value is exactly invariant to shifts written through gamma and beta
(`analysis.weights.shift_layers`) and, once running statistics follow, to rescaling the raw weight.
Chains whose output flows (through degree-1 ops) into LayerNorm / GroupNorm / an unfolded BatchNorm
are scale-free as a whole and are excluded too. (Inside a residual branch the bias term's product
would not be invariant to rescaling the residual stream, so branches get no bias term.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..analysis.structure import Chain, Structure, WeightLayer
from ..auditing import Analysis, homogeneous_layers
from ..ops import Role, spec_of

NORMALIZERS = {
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "batch_norm",
    "batch_norm_train",
    "batch_norm_unfoldable",
}


@dataclass
class CoveredLayer:
    """One covered layer: which tensor carries its scale, and which term it belongs to."""

    name: str
    weight: str  # state_dict key of the weight (conv/linear)
    carrier: str  # the parameter the main term's gradient reaches: the weight, or the BN's gamma
    bias: str | None  # the parameter holding its (effective) bias: its own bias or the BN's beta
    term: str  # "chain 3" or "block 1 branch" / "block 1 projection"
    folded_bn: str | None = None


@dataclass
class ExcludedWeight:
    name: str
    key: str
    reason: str


@dataclass
class Coverage:
    covered: list[CoveredLayer]
    excluded: list[ExcludedWeight]
    form: str
    strength: float

    def __str__(self) -> str:
        lines = [
            f"WeightScaleRegularizer(form={self.form}, strength={self.strength:g}): "
            f"{len(self.covered)} layers covered, {len(self.excluded)} weights excluded"
        ]
        for layer in self.covered:
            if layer.carrier != layer.weight:
                folded = f"folded norm of {layer.weight} with {layer.folded_bn}"
                lines.append(f"  + {layer.carrier} ({folded}) [{layer.term}]")
            else:
                lines.append(f"  + {layer.weight} [{layer.term}]")
        for item in self.excluded:
            lines.append(f"  - {item.key}: {item.reason}")
        return "\n".join(lines)


@dataclass
class Unit:
    """A covered layer inside the penalty."""

    layer: WeightLayer
    term: int
    role: str  # "chain" | "branch" | "projection"
    position: int  # index inside its chain
    chain: int  # index of its chain among kept chains (for the bias term)


@dataclass
class Term:
    label: str
    kind: str  # "chain" | "block"
    units: list[int] = field(default_factory=list)
    projection: int | None = None  # unit index of a projection shortcut


@dataclass
class TermPlan:
    """The penalty's structure: covered units, the terms they form, and what was left out."""

    units: list[Unit]
    terms: list[Term]
    component: list[int]  # term index -> balanced-form component
    covered: list[CoveredLayer]
    excluded: list[ExcludedWeight]

    @property
    def components(self) -> int:
        return max(self.component, default=-1) + 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module behind DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """analyze() switches the model to eval mode; give the user back the modes they had."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def feeds_normalizer(analysis: Analysis, chain: Chain) -> str | None:
    """Name of a normalization op reached from the chain's output through degree-1 ops, if any."""
    graph, consumers = analysis.graph, analysis.structure.consumers
    frontier, seen = [chain.layers[-1].out], set()
    while frontier:
        current = frontier.pop()
        for reader in consumers.get(current, []):
            if reader in seen:
                continue
            seen.add(reader)
            node = graph.nodes[reader]
            if node.op in NORMALIZERS:
                return node.label
            spec = spec_of(node.op)
            if spec is not None and spec.role is Role.HOMOGENEOUS and len(node.inputs) == 1:
                frontier.append(reader)
    return None


def bias_key(layer: WeightLayer) -> str | None:
    """The tensor holding a layer's effective bias: its own bias, or its folded BatchNorm's beta."""
    return layer.bn.bias if layer.bn is not None else layer.bias


def plan_terms(analysis: Analysis, params: dict[str, Any]) -> TermPlan:
    """Group the audit's chains and residual blocks into penalty terms over the module's parameters."""
    structure: Structure = analysis.structure
    homogeneous = homogeneous_layers(structure)
    excluded: list[ExcludedWeight] = []
    in_block: set[int] = set()
    projections: set[str] = set()
    for block in structure.blocks:
        in_block.add(block.branch.id)
        if block.projection is not None:
            projections.add(block.projection.node)

    def problem(layer: WeightLayer) -> str | None:
        if layer.name not in homogeneous:
            return "not in a homogeneous chain or residual block (a 1-layer chain next to a barrier)"
        carrier = layer.bn.weight if layer.bn is not None else layer.weight
        if carrier not in params:
            return f"'{carrier}' is not a parameter of the module"
        if not params[carrier].requires_grad:
            return f"'{carrier}' is frozen (requires_grad=False)"
        return None

    def exclude_chain(chain: Chain, reason: str) -> None:
        for layer in chain.layers:
            excluded.append(ExcludedWeight(layer.name, layer.weight, reason))

    units: list[Unit] = []
    terms: list[Term] = []
    kept_chains = 0

    def add_units(chain: Chain, term: int, role: str) -> list[int]:
        nonlocal kept_chains
        indices = []
        for position, layer in enumerate(chain.layers):
            indices.append(len(units))
            units.append(Unit(layer, term, role, position, kept_chains))
        kept_chains += 1
        return indices

    projection_chain = {
        block.id: next(c for c in structure.chains if c.layers[0].node == block.projection.node)
        for block in structure.blocks
        if block.projection is not None
    }
    for block in structure.blocks:
        chains = [block.branch] + ([projection_chain[block.id]] if block.id in projection_chain else [])
        reasons = [r for c in chains for r in map(problem, c.layers) if r]
        if reasons:
            for c in chains:
                exclude_chain(c, f"residual block {block.id} not covered: {reasons[0]}")
            continue
        term = Term(f"block {block.id}", "block")
        term.units = add_units(block.branch, len(terms), "branch")
        if block.id in projection_chain:
            term.projection = add_units(projection_chain[block.id], len(terms), "projection")[0]
        terms.append(term)
    for chain in structure.chains:
        if chain.id in in_block or chain.layers[0].node in projections:
            continue
        reasons = [r for r in map(problem, chain.layers) if r]
        if reasons:
            exclude_chain(chain, reasons[0])
            continue
        normalizer = feeds_normalizer(analysis, chain)
        if normalizer is not None:
            exclude_chain(chain, f"chain output feeds normalization '{normalizer}': its scale is unidentifiable")
            continue
        term = Term(f"chain {chain.id}", "chain")
        term.units = add_units(chain, len(terms), "chain")
        terms.append(term)

    has_blocks = any(t.kind == "block" for t in terms)
    # Balanced-form components: per chain without residual blocks, else one for the whole network.
    component = [0 if has_blocks else index for index in range(len(terms))]

    for unit in units:
        layer = unit.layer
        if layer.bn is not None:
            excluded.append(
                ExcludedWeight(
                    layer.name,
                    layer.weight,
                    f"feeds BatchNorm '{layer.bn.name}' (scale-free in train mode): the folded norm is "
                    f"penalized through its gamma '{layer.bn.weight}'; this weight keeps its own weight decay",
                )
            )
    covered = [
        CoveredLayer(
            name=u.layer.name,
            weight=u.layer.weight,
            carrier=u.layer.bn.weight if u.layer.bn is not None else u.layer.weight,
            bias=bias_key(u.layer) if bias_key(u.layer) in params else None,
            term=terms[u.term].label + ("" if u.role == "chain" else f" {u.role}"),
            folded_bn=u.layer.bn.name if u.layer.bn is not None else None,
        )
        for u in units
    ]
    covered_names = {u.layer.name for u in units} | {e.name for e in excluded}
    for layer in structure.layers:
        if layer.name not in covered_names:
            excluded.append(ExcludedWeight(layer.name, layer.weight, "not part of any chain term"))
    return TermPlan(units, terms, component, covered, excluded)
