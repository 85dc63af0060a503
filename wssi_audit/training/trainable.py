"""The model being fine-tuned: loading it, fitting the data's shape to it, evaluating and saving it.

torch.export programs (.pt2): `program.module()` trains, but cannot switch to train mode, so BatchNorm
keeps using (and does not update) its running statistics and dropout stays off; and it only accepts
the batch size it was exported with, so batches are fed in chunks of that size (gradients summed,
examples that do not fill a chunk at the end of an epoch are skipped).

Data whose examples have as many elements as the model's input but another shape (digits 1x8x8 for
an MLP on 64 features) are reshaped to the model's input shape, which is read from the exported
program, or from a first Linear layer, or found by trying the flat shape.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cli_support import save_atomic
from ..errors import InputError, describe
from .data import Data


@dataclass
class Trainable:
    module: nn.Module
    format: str
    program: Any = None  # the ExportedProgram for .pt2 inputs
    chunk: int | None = None  # fixed batch size of an exported program, None when free
    train_mode: bool = True  # False for exported programs (no train() on them)


@dataclass
class AuditSummary:
    log10_intrinsic_norm: float | None  # sum over chains of log10 prod ||W||
    max_imbalance_decades: float | None
    log10_input_gradient_bound: float | None
    accuracy: float
    loss: float


def load_trainable(model_path: Path, arch: str | None, trust_pickle: bool, example: torch.Tensor) -> Trainable:
    from ..loading import load_model

    loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle, example_inputs=(example,))
    if loaded.format == "onnx":
        raise InputError("ONNX models cannot be fine-tuned: give the PyTorch model (.pt2, state dict or module)")
    if loaded.format == "torchscript":
        raise InputError("TorchScript archives cannot be fine-tuned: save the model with torch.export.save (.pt2)")
    if isinstance(loaded.model, torch.export.ExportedProgram):
        program = loaded.model
        module = program.module()
        exported = program.example_inputs[0] if program.example_inputs else (example,)
        chunk = int(exported[0].shape[0]) if exported and torch.is_tensor(exported[0]) else None
        return Trainable(module, "torch.export", program, chunk, train_mode=False)
    return Trainable(loaded.model.float(), loaded.format)


def _declared_input_shape(trainable: Trainable) -> tuple[int, ...] | None:
    """The per-example input shape the model states: an exported program's, or a first Linear's."""
    if trainable.program is not None and trainable.program.example_inputs:
        first = trainable.program.example_inputs[0][0]
        if torch.is_tensor(first):
            return tuple(first.shape[1:])
    for module in trainable.module.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, nn.modules.conv._ConvNd):
            return None
    return None


def forward_eval(trainable: Trainable, x: torch.Tensor) -> torch.Tensor:
    if trainable.train_mode:
        was = trainable.module.training
        trainable.module.eval()
        try:
            return trainable.module(x)
        finally:
            trainable.module.train(was)
    return trainable.module(x)


def fit_input_shape(trainable: Trainable, data: Data) -> tuple[int, ...]:
    """The per-example shape to feed the model: the data's own, else a reshape with the same number of
    elements that the model accepts. One clear error when nothing fits, or when outputs are not logits."""
    sample = data.sample()
    count = trainable.chunk or 2
    elements = math.prod(data.sample_shape)
    candidates = [data.sample_shape]
    for shape in (_declared_input_shape(trainable), (elements,)):
        if shape is not None and math.prod(shape) == elements and shape not in candidates:
            candidates.append(shape)
    first_error: Exception | None = None
    for shape in candidates:
        batch = sample.reshape(1, *shape).expand(count, *shape)
        try:
            with torch.no_grad():
                out = forward_eval(trainable, batch)
        except Exception as error:
            first_error = first_error or error
            continue
        if out.dim() != 2 or out.shape[0] != count:
            raise InputError(
                f"the model outputs shape {tuple(out.shape)}; fine-tuning needs class logits (batch, classes)"
            )
        if out.shape[1] < data.labels:
            raise InputError(f"the model has {out.shape[1]} outputs but the data has labels up to {data.labels - 1}")
        return shape
    assert first_error is not None
    raise InputError(f"data examples of shape {data.sample_shape} do not fit the model: {describe(first_error)}")


def examples(dataset: Any, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The first `count` training examples as one batch of the model's input shape."""
    xs = [dataset[i][0] for i in range(min(count, len(dataset)))]
    return torch.stack(xs).reshape(len(xs), *shape)


def chunks(trainable: Trainable, size: int) -> list[tuple[int, int]]:
    """(start, end) pieces of a batch: the whole batch, or full chunks of an exported program's size."""
    step = trainable.chunk or size
    return [(start, start + step) for start in range(0, size - step + 1, step)]


def summary(report: Any, accuracy: float, loss: float) -> AuditSummary:
    norms = [c.log10_intrinsic_norm for c in report.chains]
    finite = all(math.isfinite(v) for v in norms)
    return AuditSummary(
        log10_intrinsic_norm=sum(norms) if norms and finite else None,
        max_imbalance_decades=report.summary.max_imbalance_decades,
        log10_input_gradient_bound=report.summary.gradient.log10_frobenius_bound,
        accuracy=accuracy,
        loss=loss,
    )


def audit_summary(trainable: Trainable, example: torch.Tensor, accuracy: float, loss: float) -> AuditSummary:
    """The audit of the trained model (a CPU copy, or a freshly exported program)."""
    from ..auditing import analyze

    model = export(trainable) if trainable.program is not None else copy.deepcopy(trainable.module).cpu().eval()
    return summary(analyze(model, (example,), verify=False).report, accuracy, loss)


def export(trainable: Trainable) -> torch.export.ExportedProgram:
    """Re-export the trained module (a CPU copy) with the original program's example inputs."""
    program = trainable.program
    args, kwargs = program.example_inputs if program.example_inputs else ((), {})
    module = copy.deepcopy(trainable.module).cpu()
    args = tuple(a.cpu() if torch.is_tensor(a) else a for a in args)
    return torch.export.export(module, args, kwargs or None)


def save_model(trainable: Trainable, output: Path) -> None:
    """The trained model in its input's format (atomically)."""
    if trainable.format == "torch.export":
        program = export(trainable)
        save_atomic(output, lambda path: torch.export.save(program, path))
        return
    module = copy.deepcopy(trainable.module).cpu().eval()
    if trainable.format == "pickle":
        save_atomic(output, lambda path: torch.save(module, path))
    elif trainable.format == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_atomic(output, lambda path: save_file(state, path))
    else:
        save_atomic(output, lambda path: torch.save(module.state_dict(), path))
