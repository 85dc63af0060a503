"""Function-preserving rebalancing: equalize the layer norms inside every homogeneous chain.

For a chain with layer norms ||W_l||, the shift g_l with log10 g_l = mean_k log10||W_k|| - log10||W_l||
(prod g_l = 1) makes every layer norm equal to the geometric mean, keeps the intrinsic norm
prod ||W_l|| and the network's function, and minimizes weight decay's penalty sum ||W_l||^2 over the
chain's shift orbit (AM-GM, science.md s.3). Biases and folded BatchNorm are handled by
`shift_layers`. Residual blocks: each branch is a chain of its own and is balanced inside; the
residual-stream scale (stem and head against every block) is NOT changed: it would need a shift
across blocks that the structure analysis does not model, so it is left as it is.
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
from .analysis.verify import TOLERANCE, relative_error
from .analysis.weights import shift_layers
from .audit import Analysis, analyze
from .errors import AnalysisInconsistency, InputError


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
    notes: list[str] = field(default_factory=list)


def _summary(analysis: Analysis, tensors: Mapping[str, torch.Tensor]) -> tuple[float, float, float]:
    """(sum ||W_eff||^2 over layers, sum of chain log10 intrinsic norms, max chain imbalance)."""
    norms = layer_norms(analysis.structure.layers, tensors, spectral=False)
    decay = sum(n.frobenius**2 for n in norms.values())
    metrics = [(chain, chain_metrics(chain, norms)) for chain in analysis.structure.chains]
    intrinsic = sum(m.log10_intrinsic_norm for _, m in metrics)
    imbalances = [m.imbalance_decades for c, m in metrics if len(c.layers) > 1 and math.isfinite(m.imbalance_decades)]
    return decay, intrinsic, max(imbalances, default=0.0)


def balance_factors(analysis: Analysis) -> tuple[dict[str, torch.Tensor], dict[str, float], int, list[str]]:
    """The overrides realising the balancing shift of every chain of 2+ layers."""
    tensors = analysis.graph.tensors
    norms = layer_norms(analysis.structure.layers, tensors, spectral=False)
    overrides: dict[str, torch.Tensor] = {}
    factors: dict[str, float] = {}
    notes: list[str] = []
    balanced = 0
    for chain in analysis.structure.chains:
        if len(chain.layers) < 2:
            continue
        logs = [norms[layer.name].log10_frobenius for layer in chain.layers]
        if not all(math.isfinite(v) for v in logs):
            notes.append(f"chain {chain.id} has an all-zero layer: left as it is")
            continue
        mean = sum(logs) / len(logs)
        shifts = [mean - v for v in logs]
        overrides.update(shift_layers(chain.layers, shifts, tensors))
        factors.update({layer.name: s for layer, s in zip(chain.layers, shifts)})
        balanced += 1
    return overrides, factors, balanced, notes


def balance(
    model: Any,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    method: str = "auto",
    seed: int = 0,
) -> BalanceResult:
    """Balance every chain of `model` (nn.Module, ExportedProgram, onnx.ModelProto, a path or a
    `LoadedModel`) and check on an example input that the outputs did not change."""
    if isinstance(model, (str, Path)):
        from .loading import load_model

        model = load_model(model)  # once: the audit and the rewrite share it
    analysis = analyze(model, example_inputs, method=method, verify=True, seed=seed)
    report, graph = analysis.report, analysis.graph
    if report.failed_chains:
        ids = [c.id for c in report.failed_chains]
        raise AnalysisInconsistency(f"chains {ids} failed the scale-shift self-check: refusing to rebalance")
    if graph.runner is None:
        raise InputError("rebalancing needs an example input to check the outputs: give --input-shape")
    overrides, factors, balanced, notes = balance_factors(analysis)
    shifted = {**graph.tensors, **overrides}
    decay_before, intrinsic_before, imbalance_before = _summary(analysis, graph.tensors)
    decay_after, intrinsic_after, imbalance_after = _summary(analysis, shifted)
    error = relative_error(graph.runner({}), graph.runner(overrides)) if overrides else 0.0
    tolerance = TOLERANCE.get(graph.runner_dtype, 1e-3)
    if error > tolerance:
        raise AnalysisInconsistency(f"rebalancing changed the outputs by {error:.2e} (tolerance {tolerance:g})")
    original, fmt = _original(model)
    return BalanceResult(
        model=apply_overrides(original, overrides, graph),
        format=fmt,
        overrides=overrides,
        log10_factors=factors,
        weight_decay_before=decay_before,
        weight_decay_after=decay_after,
        log10_intrinsic_before=intrinsic_before,
        log10_intrinsic_after=intrinsic_after,
        max_imbalance_before=imbalance_before,
        max_imbalance_after=imbalance_after,
        max_relative_error=error,
        check_dtype=str(graph.runner_dtype).replace("torch.", ""),
        chains_balanced=balanced,
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


def save_balanced(result: BalanceResult, path: str | Path) -> str:
    """Write the balanced model atomically in the input's format; returns the format written."""
    from .cli_support import save_atomic

    model = result.model
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
    if result.format == "safetensors" or Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        save_atomic(path, lambda tmp: save_file(state, tmp))
        return "safetensors"
    save_atomic(path, lambda tmp: torch.save(state, tmp))
    return "state_dict"
