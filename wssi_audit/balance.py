"""Function-preserving rebalancing: equalize the layer norms inside every homogeneous chain.

For a chain with layer norms ||W_l||, the shift g_l with log10 g_l = mean_k log10||W_k|| - log10||W_l||
(prod g_l = 1) makes every layer norm equal to the geometric mean, keeps the intrinsic norm
prod ||W_l|| and the network's function, and minimizes weight decay's penalty sum ||W_l||^2 over the
chain's shift orbit (AM-GM, science.md s.3). Biases and folded BatchNorm are handled by
`shift_layers`.

Residual networks: each branch is a chain of its own and is balanced inside. The residual stream
(the tensors the blocks add into) has one more scale symmetry: scale the stem chain's output by a,
every block branch and projection shortcut by a through their biases only (their input is already
a times larger), and divide the head chain that reads the stream by a. When the graph has that
shape (a stem chain, blocks, head chains reading the stream, nothing else touching it), `balance`
also picks a so that the stem and head layers reach one common norm (minimum sum ||W||^2), and keeps
it only if the outputs are unchanged on the example input. Per-chain intrinsic norms of the stem and
head then move by +-log10 a; their sum and the residual input-gradient bound do not.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .analysis.metrics import chain_metrics, layer_norms
from .analysis.structure import Chain
from .analysis.verify import TOLERANCE, random_nodes, relative_error
from .analysis.weights import shift_layers
from .auditing import Analysis, analyze
from .errors import AnalysisInconsistency, InputError
from .ops import Role, spec_of


@dataclass
class BalanceResult:
    """The balanced model (same kind as the input) and what changed."""

    model: Any  # nn.Module | torch.export.ExportedProgram | onnx.ModelProto
    format: str  # the loaded format ("state_dict", "torch.export", "onnx", ...)
    overrides: dict[str, torch.Tensor]  # state_dict key / initializer name -> new tensor (float64)
    log10_factors: dict[str, float]  # layer name -> log10 g_l
    weight_decay_before: float  # sum over weight layers of ||W_eff||^2 (BatchNorm folded)
    weight_decay_after: float
    log10_intrinsic_before: float  # sum over chains of log10 prod ||W_l|| (invariant)
    log10_intrinsic_after: float
    max_imbalance_before: float
    max_imbalance_after: float
    max_relative_error: float  # output change on the example input
    check_dtype: str  # dtype the outputs were compared in
    chains_balanced: int = 0
    residual_stream: bool = False  # the residual-stream scale was balanced too
    notes: list[str] = field(default_factory=list)
    checkpoint: Any = None  # loading.Checkpoint: the training checkpoint the state dict came from


def _summary(analysis: Analysis, tensors: Mapping[str, torch.Tensor]) -> tuple[float, float, float]:
    """(sum ||W_eff||^2 over layers, sum of chain log10 intrinsic norms, max chain imbalance)."""
    norms = layer_norms(analysis.structure.layers, tensors, spectral=False)
    decay = sum(n.frobenius**2 for n in norms.values())
    metrics = [(chain, chain_metrics(chain, norms)) for chain in analysis.structure.chains]
    intrinsic = sum(m.log10_intrinsic_norm for _, m in metrics)
    imbalances = [m.imbalance_decades for c, m in metrics if len(c.layers) > 1 and math.isfinite(m.imbalance_decades)]
    return decay, intrinsic, max(imbalances, default=0.0)


def chain_factors(analysis: Analysis) -> tuple[dict[int, list[float]], list[str]]:
    """log10 g_l that equalize the layer norms of every chain of 2+ layers (chain id -> factors)."""
    norms = layer_norms(analysis.structure.layers, analysis.graph.tensors, spectral=False)
    factors: dict[int, list[float]] = {}
    notes: list[str] = []
    for chain in analysis.structure.chains:
        logs = [norms[layer.name].log10_frobenius for layer in chain.layers]
        if len(chain.layers) > 1 and not all(math.isfinite(v) for v in logs):
            notes.append(f"chain {chain.id} has an all-zero layer: left as it is")
        elif len(chain.layers) > 1:
            mean = sum(logs) / len(logs)
            factors[chain.id] = [mean - v for v in logs]
    return factors, notes


@dataclass
class StreamPlan:
    """How each chain meets the residual stream: log10 scale of its input and of its output."""

    scales: dict[int, tuple[int, int]]  # chain id -> (input in units of a, output in units of a): 0 or 1
    stem: Chain
    heads: list[Chain]


def stream_plan(analysis: Analysis) -> StreamPlan | None:
    """The residual-stream symmetry of the graph, when it has the simple shape (module doc)."""
    structure, graph = analysis.structure, analysis.graph
    if not structure.blocks:
        return None
    chain_of = {layer.node: chain for chain in structure.chains for layer in chain.layers}
    out_to_layer = {layer.out: layer for layer in structure.layers}
    through: dict[str, Chain] = {}  # first layer node -> chain that passes the stream on
    for block in structure.blocks:
        through[block.branch.layers[0].node] = block.branch
        if block.projection is not None:
            through[block.projection.node] = chain_of[block.projection.node]
    # The stem: the weight layer whose output reaches the first block's fork through unary ops.
    current = structure.blocks[0].fork
    while current not in out_to_layer:
        node = graph.nodes[current]
        spec = spec_of(node.op)
        if spec is None or spec.role is not Role.HOMOGENEOUS or len(node.inputs) != 1:
            return None
        current = node.inputs[0]
    stem = chain_of[out_to_layer[current].node]
    if stem.layers[-1].out != current or stem.layers[0].node in through:
        return None
    scales: dict[int, tuple[int, int]] = {stem.id: (0, 1)}
    heads: list[Chain] = []
    region: set[str] = set()
    joins: set[str] = set()
    frontier = [current]
    while frontier:
        name = frontier.pop()
        if name in region:
            continue
        region.add(name)
        for reader in structure.consumers[name]:
            node = graph.nodes[reader]
            if reader in through:
                chain = through[reader]
                scales[chain.id] = (1, 1)
                frontier.append(chain.layers[-1].out)
            elif reader in chain_of:
                chain = chain_of[reader]
                if chain.layers[0].node != reader or chain.id in scales:
                    return None
                scales[chain.id] = (1, 0)
                heads.append(chain)
            else:
                spec = spec_of(node.op)
                if spec is None or spec.role not in (Role.HOMOGENEOUS, Role.JOIN) or node.op == "split":
                    return None  # the stream meets a barrier, an unknown op or the output
                if spec.role is Role.JOIN:
                    joins.add(reader)
                elif len(node.inputs) != 1:
                    return None
                frontier.append(reader)
    if not heads or any(i not in region for j in joins for i in graph.nodes[j].inputs):
        return None
    return StreamPlan(scales, stem, heads)


def _stream_log10_scale(plan: StreamPlan, analysis: Analysis, factors: dict[int, list[float]]) -> float:
    """log10 a minimizing sum ||W||^2 over the stem and head layers (after in-chain balancing)."""
    norms = layer_norms(analysis.structure.layers, analysis.graph.tensors, spectral=False)

    def levels(chain: Chain) -> list[float]:
        own = factors.get(chain.id, [0.0] * len(chain.layers))
        return [norms[layer.name].log10_frobenius + f for layer, f in zip(chain.layers, own)]

    groups = [(levels(plan.stem), 1.0 / len(plan.stem.layers))]
    groups += [(levels(head), -1.0 / len(head.layers)) for head in plan.heads]

    def penalty(alpha: float) -> float:  # convex in alpha
        return sum(10.0 ** (2 * (v + step * alpha)) for values, step in groups for v in values)

    low, high = -30.0, 30.0
    for _ in range(200):
        a, b = low + (high - low) / 3, high - (high - low) / 3
        if penalty(a) <= penalty(b):
            high = b
        else:
            low = a
    return (low + high) / 2


def balance_overrides(
    analysis: Analysis, factors: dict[int, list[float]], plan: StreamPlan | None, log10_a: float
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Tensors of the combined shift: in-chain factors plus the stream scale a (when a plan)."""
    tensors = analysis.graph.tensors
    overrides: dict[str, torch.Tensor] = {}
    per_layer: dict[str, float] = {}
    for chain in analysis.structure.chains:
        own = list(factors.get(chain.id, [0.0] * len(chain.layers)))
        scale_in, scale_out = plan.scales.get(chain.id, (0, 0)) if plan else (0, 0)
        if scale_in == scale_out == 0 and chain.id not in factors:
            continue
        # The chain's own factors must add up to (out - in) * log10 a: spread that evenly.
        spread = (scale_out - scale_in) * log10_a / len(chain.layers)
        own = [f + spread for f in own]
        overrides.update(
            shift_layers(
                chain.layers,
                own,
                tensors,
                log10_input_scale=scale_in * log10_a,
                log10_output_scale=scale_out * log10_a,
            )
        )
        per_layer.update({layer.name: f for layer, f in zip(chain.layers, own)})
    return overrides, per_layer


def balance(
    model: Any,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    method: str = "auto",
    seed: int = 0,
    residual_stream: bool = True,
) -> BalanceResult:
    """Balance every chain of `model` (nn.Module, ExportedProgram, onnx.ModelProto, a path or a
    `LoadedModel`) and check on an example input that the outputs did not change."""
    if isinstance(model, (str, Path)):
        from .loading import load_model

        model = load_model(model)  # once: the audit and the rewrite share it
    analysis = analyze(model, example_inputs, method=method, verify=True, seed=seed)
    report, graph = analysis.report, analysis.graph
    broken = next((f for f in report.findings if f.code == "non_finite_weights"), None)
    if broken:  # the model is broken, not the analysis: say so, not "failed the self-check"
        raise InputError(f"{broken.message}: nothing to rebalance")
    drawing = random_nodes(graph)
    if drawing:
        raise InputError(
            f"{drawing[0].op} '{drawing[0].label}' draws random numbers at every run, so outputs before and after "
            "cannot be compared: export the model in eval mode (model.eval()) to rebalance it"
        )
    if report.failed_chains:
        ids = [c.id for c in report.failed_chains]
        raise AnalysisInconsistency(f"chains {ids} failed the scale-shift self-check: refusing to rebalance")
    if graph.runner is None:
        raise InputError("rebalancing needs an example input to check the outputs: give --input-shape")
    factors, notes = chain_factors(analysis)
    tolerance = TOLERANCE.get(graph.runner_dtype, 1e-3)
    reference = graph.runner({})
    plan = stream_plan(analysis) if residual_stream else None
    overrides: dict[str, torch.Tensor] = {}
    if plan is not None:
        log10_a = _stream_log10_scale(plan, analysis, factors)
        overrides, per_layer = balance_overrides(analysis, factors, plan, log10_a)
        error = relative_error(reference, graph.runner(overrides))
        if error <= tolerance:
            notes.append(f"residual stream rescaled by 10^{log10_a:+.3f} (stem and head balanced against each other)")
        else:
            notes.append(f"residual-stream rescaling changed the outputs ({error:.1e}): not applied")
            plan, overrides = None, {}
    if plan is None:
        overrides, per_layer = balance_overrides(analysis, factors, None, 0.0)
        error = relative_error(reference, graph.runner(overrides)) if overrides else 0.0
    if error > tolerance:
        raise AnalysisInconsistency(f"rebalancing changed the outputs by {error:.2e} (tolerance {tolerance:g})")
    shifted = {**graph.tensors, **overrides}
    decay_before, intrinsic_before, imbalance_before = _summary(analysis, graph.tensors)
    decay_after, intrinsic_after, imbalance_after = _summary(analysis, shifted)
    original, fmt = _original(model)
    return BalanceResult(
        checkpoint=getattr(model, "checkpoint", None),
        model=apply_overrides(original, overrides, graph),
        format=fmt,
        overrides=overrides,
        log10_factors=per_layer,
        weight_decay_before=decay_before,
        weight_decay_after=decay_after,
        log10_intrinsic_before=intrinsic_before,
        log10_intrinsic_after=intrinsic_after,
        max_imbalance_before=imbalance_before,
        max_imbalance_after=imbalance_after,
        max_relative_error=error,
        check_dtype=str(graph.runner_dtype).replace("torch.", ""),
        chains_balanced=len(factors),
        residual_stream=plan is not None,
        notes=notes,
    )


def _original(model: Any) -> tuple[Any, str]:
    from .loading import LoadedModel

    if isinstance(model, LoadedModel):
        return model.model, model.format
    if isinstance(model, torch.export.ExportedProgram):
        return model, "torch.export"
    if type(model).__name__ == "ModelProto":
        return model, "onnx"
    return model, "module"


def apply_overrides(model: Any, overrides: Mapping[str, torch.Tensor], graph: Any = None) -> Any:
    """A copy of `model` with some tensors replaced; the input model is never modified."""
    if type(model).__name__ == "ModelProto":
        onnx_model = getattr(graph, "onnx_model", None)
        if onnx_model is None:
            from .frontends.onnx_frontend import OnnxModel, normalize

            onnx_model = OnnxModel(normalize(model))
        return onnx_model.with_tensors(overrides)
    if isinstance(model, torch.export.ExportedProgram):
        # Same graph, new tensors: a shallow copy with fresh state_dict / constants dicts. (A deep
        # copy renames placeholders, e.g. `input` -> `input_1`, and then fails to save.)
        program = copy.copy(model)
        state = {k: _fresh(v) for k, v in model.state_dict.items()}
        constants = {k: _fresh(v) for k, v in getattr(model, "constants", {}).items()}
        _write({**state, **constants}, overrides)
        program._state_dict = state
        program._constants = constants
        return program
    if isinstance(model, torch.nn.Module):
        module = copy.deepcopy(model)
        targets = dict(module.state_dict(keep_vars=True))
        _write(targets, overrides)
        return module
    raise InputError(f"cannot rebalance an object of type {type(model).__name__}")


def _fresh(value: Any) -> Any:
    """A copy of a tensor (a Parameter stays a Parameter), so the input program is not modified."""
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _write(targets: Mapping[str, Any], overrides: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(overrides) - set(targets))
    if missing:
        raise AnalysisInconsistency(f"tensors not found in the model: {', '.join(missing[:5])}")
    with torch.no_grad():
        for key, value in overrides.items():
            target = targets[key]
            target.data.copy_(value.to(target.dtype).view_as(target))


# File names that `audit` reads back as what `save_balanced` writes, per loaded format. A TorchScript
# input is balanced as the torch.export program it was converted to; an in-memory module ("module")
# is written as its state dict.
OUTPUT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "torch.export": (".pt2",),
    "torchscript": (".pt2",),
    "onnx": (".onnx",),
    "pickle": (".pt", ".pth"),
    "state_dict": (".pt", ".pth", ".bin", ".ckpt", ".safetensors"),
    "safetensors": (".safetensors", ".pt", ".pth", ".bin"),
    "module": (".pt", ".pth", ".bin", ".safetensors"),
}
WRITTEN = {"torch.export": "a torch.export archive", "torchscript": "a torch.export archive", "onnx": "an ONNX model"}


def check_output_suffix(fmt: str, path: str | Path, checkpoint: Any = None) -> None:
    """Before any work: the output's name says the format that will be written into it."""
    suffix = Path(path).suffix.lower()
    allowed = OUTPUT_SUFFIXES.get(fmt, OUTPUT_SUFFIXES["module"])
    what = WRITTEN.get(fmt, "a pickled module" if fmt == "pickle" else "a state dict")
    if suffix not in allowed:
        stem = Path(path).stem if suffix in {s for v in OUTPUT_SUFFIXES.values() for s in v} else Path(path).name
        raise InputError(
            f"balance writes {what} for this {fmt} model: name the output {' or '.join(allowed)} "
            f"(e.g. {stem + allowed[0]}), not {Path(path).name}"
        )
    if checkpoint is not None and suffix == ".safetensors":
        raise InputError(
            "the model's weights came from a training checkpoint, whose other entries only torch's format keeps: "
            f"name the output .pt, .pth or .ckpt, not {Path(path).name}"
        )


def save_balanced(result: BalanceResult, path: str | Path) -> str:
    """Write the balanced model atomically in the input's format (a nested checkpoint with every
    other entry kept); returns the format written."""
    from .cli_support import save_atomic

    model = result.model
    check_output_suffix(result.format, path, result.checkpoint)
    if type(model).__name__ == "ModelProto":
        import onnx

        save_atomic(path, lambda tmp: onnx.save(model, tmp))
        return "onnx"
    if isinstance(model, torch.export.ExportedProgram):
        save_atomic(path, lambda tmp: torch.export.save(model, tmp))
        return "torch.export"
    if result.format == "pickle":
        save_atomic(path, lambda tmp: torch.save(model, tmp))
        return "pickle"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if Path(path).suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_atomic(path, lambda tmp: save_file(state, tmp))
        return "safetensors"
    if result.checkpoint is not None:
        container = result.checkpoint.with_state(state)
        save_atomic(path, lambda tmp: torch.save(container, tmp))
        return "checkpoint"
    save_atomic(path, lambda tmp: torch.save(state, tmp))
    return "state_dict"
