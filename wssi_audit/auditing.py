"""The audit: graph -> structure -> metrics -> self-check -> `Report`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .analysis.certified import certified_bound
from .analysis.gradient import measured_log10_gradient
from .analysis.metrics import (
    block_log10_branch_norm,
    chain_metrics,
    layer_norms,
    log10_input_gradient_bound,
    log10_path2_norm,
)
from .analysis.structure import Structure, find_structure
from .analysis.verify import Verification, global_check_failed, verify_chains
from .analysis.weights import effective_weight
from .findings import find
from .frontends import build_graph
from .ir import Graph
from .ops import Status
from .report import (
    BarrierRecord,
    ChainRecord,
    GradientRecord,
    LayerRecord,
    ModelRecord,
    Report,
    ResidualBlockRecord,
    SummaryRecord,
    TraceRecord,
    UnanalyzedRecord,
)


@dataclass
class Analysis:
    """Everything the audit computed, for other features (regularizer, balance) to reuse."""

    graph: Graph
    structure: Structure
    report: Report


def homogeneous_layers(structure: Structure) -> set[str]:
    """Layers the network is positively homogeneous in: chains of 2+, residual blocks,
    or every layer when the graph has no barrier and no unknown op."""
    clean = not any(s.status in (Status.BARRIER, Status.UNKNOWN) for s in structure.statuses.values())
    names: set[str] = set()
    for chain in structure.chains:
        if clean or len(chain.layers) > 1:
            names.update(layer.name for layer in chain.layers)
    for block in structure.blocks:
        names.update(layer.name for layer in block.branch.layers)
        if block.projection is not None:
            names.add(block.projection.name)
    return names


def analyze_graph(
    graph: Graph,
    *,
    source: str = "<module>",
    format: str = "module",
    verify: bool = True,
    measure: bool = True,
    seed: int = 0,
    measure_on: torch.Tensor | None = None,
) -> Analysis:
    structure = find_structure(graph)
    effective = {layer.name: effective_weight(layer, graph.tensors) for layer in structure.layers}
    norms = layer_norms(structure.layers, graph.tensors, effective_weights=effective)
    chain_of_layer = {layer.name: chain.id for chain in structure.chains for layer in chain.layers}
    homogeneous = homogeneous_layers(structure)
    verification = verify_chains(graph, structure.chains, seed, structure.consumers) if verify else None
    certified = certified_bound(graph, structure, norms, effective)

    layers = [
        LayerRecord(
            name=layer.name,
            weight=layer.weight,
            kind=layer.kind,
            shape=list(graph.tensors[layer.weight].shape),
            frobenius=norms[layer.name].frobenius,
            spectral=norms[layer.name].spectral,
            bias_norm=norms[layer.name].bias_norm,
            folded_bn=layer.bn.name if layer.bn else None,
            parameters=norms[layer.name].parameters,
            log10_frobenius=norms[layer.name].log10_frobenius,
            chain=chain_of_layer[layer.name],
            homogeneous=layer.name in homogeneous,
            status=norms[layer.name].status,
            log10_operator_norm=certified.layers.get(layer.name),
            dead=verification is not None and layer.name in verification.dead,
        )
        for layer in structure.layers
    ]

    chains = []
    for chain in structure.chains:
        metrics = chain_metrics(chain, norms)
        wd_excess = 10.0**metrics.log10_wd_excess if metrics.log10_wd_excess < 300 else None
        check = verification.chains[chain.id] if verification else None
        chains.append(
            ChainRecord(
                id=chain.id,
                weights=chain.weights,
                layers=[layer.name for layer in chain.layers],
                log10_intrinsic_norm=metrics.log10_intrinsic_norm,
                imbalance_decades=metrics.imbalance_decades,
                wd_excess=wd_excess,
                log10_wd_excess=metrics.log10_wd_excess,
                verification=check.status if check else ("trivial" if len(chain.layers) < 2 else "not_run"),
                verification_error=check.error if check else None,
                verification_power=check.power if check else None,
                verification_reason=check.reason if check else "verification skipped",
                carried={layer.name: [r.name for r in layer.carried] for layer in chain.layers if layer.carried},
            )
        )

    blocks = [
        ResidualBlockRecord(
            id=block.id,
            shortcut=block.shortcut,
            shortcut_weight=block.projection.weight if block.projection else None,
            branch_weights=block.branch.weights,
            log10_branch_norm=block_log10_branch_norm(block, norms),
            add_node=graph.nodes[block.add_node].label,
            chain=block.branch.id,
        )
        for block in structure.blocks
    ]

    barriers, unanalyzed = [], [UnanalyzedRecord(u.node, u.reason) for u in graph.unanalyzed]
    counts: dict[str, int] = {}
    for name, status in structure.statuses.items():
        counts[status.status.value] = counts.get(status.status.value, 0) + 1
        node = graph.nodes[name]
        if status.status is Status.BARRIER:
            barriers.append(BarrierRecord(node.label, node.op, status.reason))
        elif status.status is Status.UNKNOWN:
            unanalyzed.append(UnanalyzedRecord(node.label, status.reason))
    operations = sum(n for s, n in counts.items() if s != Status.STRUCTURAL.value)
    coverage = 1.0 if operations == 0 else 1.0 - counts.get(Status.UNKNOWN.value, 0) / operations

    total_weight = sum(record.parameters for record in layers)
    homogeneous_weight = sum(record.parameters for record in layers if record.homogeneous)
    frobenius, frobenius_note = log10_input_gradient_bound(graph, structure, norms, node_lipschitz=certified.pools)
    measured, measured_note, measured_method = (
        measured_log10_gradient(graph.runner, seed=seed, points=measure_on, no_runner=graph.runner_note)
        if measure
        else (None, "not measured (--no-measure)", "")
    )
    imbalances = [c.imbalance_decades for c in chains if len(c.weights) > 1]
    tally: dict[str, int] = {}
    for chain in chains:
        tally[chain.verification] = tally.get(chain.verification, 0) + 1
    intrinsic = [c.log10_intrinsic_norm for c in chains]
    global_failed = verification is not None and global_check_failed(verification)

    summary = SummaryRecord(
        chains=len(chains),
        residual_blocks=len(blocks),
        homogeneous_weight_fraction=homogeneous_weight / total_weight if total_weight else 0.0,
        max_imbalance_decades=_max_imbalance(imbalances, chains),
        gradient=GradientRecord(
            log10_frobenius_bound=frobenius,
            log10_certified_bound=certified.log10_bound,
            log10_measured=measured,
            frobenius_note=frobenius_note,
            certified_note=certified.note,
            measured_note=measured_note,
            certified_method=certified.method,
            measured_method=measured_method,
        ),
        all_verified=_all_verified(chains, verification, global_failed),
        verification=tally,
        log10_path2_norm=log10_path2_norm(graph, structure),
        log10_intrinsic_norm=sum(intrinsic) if len(chains) == 1 else None,
        verification_note=verification.note if verification else "verification skipped",
        verification_dtype=verification.dtype if verification else "",
        max_verification_error=verification.max_error if verification else None,
        global_verification_error=verification.global_error if verification else None,
    )
    report = Report(
        model=ModelRecord(source=source, format=format, parameters=int(graph.parameter_count)),
        trace=TraceRecord(
            method=graph.method, nodes=operations, coverage=coverage, unanalyzed=unanalyzed, statuses=counts
        ),
        layers=layers,
        chains=chains,
        residual_blocks=blocks,
        barriers=barriers,
        summary=summary,
        tool_version=__version__,
    )
    report.findings = find(report)
    return Analysis(graph, structure, report)


def _max_imbalance(imbalances: list[float], chains: list[ChainRecord]) -> float | None:
    if any(math.isnan(v) for v in imbalances):
        return None
    return max(imbalances) if imbalances else (0.0 if chains else None)


def _all_verified(chains: list[ChainRecord], verification: Verification | None, global_failed: bool) -> bool | None:
    """True when every chain of 2+ layers was verified (and the global check passed); None when the
    check did not run; False when one failed or could not be checked with power."""
    states = {c.verification for c in chains if c.verification != "trivial"}
    if verification is None or "not_run" in states:
        return None
    return not global_failed and states <= {"verified"}


def _as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def analyze(
    model: Any,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    method: str = "auto",
    verify: bool = True,
    measure: bool = True,
    seed: int = 0,
    source: str | None = None,
    format: str | None = None,
    measure_on: torch.Tensor | None = None,
) -> Analysis:
    """Like `audit`, but also returns the graph and structure for further use."""
    from .loading import LoadedModel, load_model

    inputs = _as_inputs(example_inputs)
    if isinstance(model, (str, Path)):
        model = load_model(model, for_analysis=True)
    if isinstance(model, LoadedModel):
        loaded = model
        model, source, format = loaded.model, loaded.source, loaded.format
        inputs = inputs if inputs is not None else loaded.example_inputs
    if format is None:
        format = "torch.export" if isinstance(model, torch.export.ExportedProgram) else "module"
    graph = build_graph(model, inputs, method)
    name = source or f"<{type(model).__name__}>"
    return analyze_graph(
        graph, source=name, format=format, verify=verify, measure=measure, seed=seed, measure_on=measure_on
    )


def audit(
    model: Any,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    method: str = "auto",
    verify: bool = True,
    measure: bool = True,
    seed: int = 0,
    measure_on: torch.Tensor | None = None,
) -> Report:
    """Audit a model (nn.Module, ExportedProgram or a file path) and return its `Report`.

    With example inputs, every chain is checked by weight scale shifts at its own end (with a
    control that the check could fail), and the input gradient is measured: at the example inputs,
    or at each example of `measure_on` (a batch shaped like the first input, batch dimension first).
    """
    return analyze(
        model, example_inputs, method=method, verify=verify, measure=measure, seed=seed, measure_on=measure_on
    ).report
