"""Fine-tune a model file with the invariant regularizer, resumably, and compare audits before/after.

Repeatability: one seed fixes the held-out split, every epoch's data order (a generator seeded with
(seed, epoch), so no state is needed to replay it) and the torch RNG (dropout). A checkpoint written
atomically after every epoch holds the weights, the optimizer state and the RNG states, so `resume`
replays the interrupted epoch exactly and ends at the same weights as an uninterrupted run.

torch.export programs (.pt2): `program.module()` trains, but cannot switch to train mode, so BatchNorm
keeps using (and does not update) its running statistics and dropout stays off; and it only accepts
the batch size it was exported with, so batches are fed in chunks of that size (gradients summed,
examples that do not fill a chunk at the end of an epoch are skipped).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from ..cli_support import save_atomic, write_atomic
from ..errors import InputError, WssiError, describe
from ..regularizer import DEFAULT_FORM, DEFAULT_STRENGTH, FORMS, WeightScaleRegularizer, attach
from .data import Split, load_dataset, split_dataset

CHECKPOINT_VERSION = 1


class TrainingDiverged(WssiError):
    """The loss became NaN or infinite (exit 2): lower the learning rate or the strength."""

    exit_code = 2


class Interrupted(Exception):
    """Raised by a step callback to stop a run (tests simulate a crash with it)."""


@dataclass
class AuditSummary:
    log10_intrinsic_norm: float | None  # sum over chains of log10 prod ||W||
    max_imbalance_decades: float | None
    log10_input_gradient_bound: float | None
    accuracy: float
    loss: float


@dataclass
class FinetuneResult:
    output: Path
    metrics: Path
    checkpoint: Path
    before: AuditSummary
    after: AuditSummary
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Trainable:
    module: nn.Module
    format: str
    program: Any = None  # the ExportedProgram for .pt2 inputs
    chunk: int | None = None  # fixed batch size of an exported program, None when free
    train_mode: bool = True  # False for exported programs (no train() on them)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.finetuned{model_path.suffix}")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"bad --device '{device}': use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available")
    return resolved


def _load_trainable(model_path: Path, arch: str | None, trust_pickle: bool, example: torch.Tensor) -> _Trainable:
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
        return _Trainable(module, "torch.export", program, chunk, train_mode=False)
    return _Trainable(loaded.model.float(), loaded.format)


def _check_shapes(trainable: _Trainable, split: Split) -> None:
    """Run one batch: a data/model mismatch becomes one clear line instead of a traceback mid-run."""
    count = trainable.chunk or min(2, split.train_x.shape[0])
    sample = split.train_x[:1].expand(count, *split.sample_shape)
    try:
        with torch.no_grad():
            out = _forward_eval(trainable, sample)
    except Exception as error:
        raise InputError(
            f"data examples of shape {split.sample_shape} do not fit the model: {describe(error)}"
        ) from None
    if out.dim() != 2 or out.shape[0] != count:
        raise InputError(f"the model outputs shape {tuple(out.shape)}; fine-tuning needs class logits (batch, classes)")
    labels = int(max(split.train_y.max(), split.val_y.max())) + 1
    if out.shape[1] < labels:
        raise InputError(f"the model has {out.shape[1]} outputs but the data has labels up to {labels - 1}")


def _forward_eval(trainable: _Trainable, x: torch.Tensor) -> torch.Tensor:
    if trainable.train_mode:
        was = trainable.module.training
        trainable.module.eval()
        try:
            return trainable.module(x)
        finally:
            trainable.module.train(was)
    return trainable.module(x)


def _chunks(trainable: _Trainable, x: torch.Tensor) -> list[tuple[int, int]]:
    size = trainable.chunk or x.shape[0]
    return [(start, start + size) for start in range(0, x.shape[0] - size + 1, size)]


@torch.no_grad()
def evaluate(trainable: _Trainable, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a held-out set, in eval mode; exported programs are fed padded chunks."""
    step = trainable.chunk or 512
    correct, total_loss = 0, 0.0
    for start in range(0, x.shape[0], step):
        xb, yb = x[start : start + step].to(device), y[start : start + step].to(device)
        real = xb.shape[0]
        if trainable.chunk and real < step:
            xb = torch.cat([xb, xb.new_zeros(step - real, *xb.shape[1:])])
        logits = _forward_eval(trainable, xb)[:real].float()
        total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / max(1, x.shape[0]), total_loss / max(1, x.shape[0])


def _audit_summary(model: Any, example: torch.Tensor, accuracy: float, loss: float) -> AuditSummary:
    from ..audit import analyze

    return _summary(analyze(model, (example,), verify=False).report, accuracy, loss)


def _summary(report: Any, accuracy: float, loss: float) -> AuditSummary:
    norms = [c.log10_intrinsic_norm for c in report.chains]
    finite = all(math.isfinite(v) for v in norms)
    return AuditSummary(
        log10_intrinsic_norm=sum(norms) if norms and finite else None,
        max_imbalance_decades=report.summary.max_imbalance_decades,
        log10_input_gradient_bound=report.summary.gradient.log10_frobenius_bound,
        accuracy=accuracy,
        loss=loss,
    )


def _cpu_copy(trainable: _Trainable) -> Any:
    """What to audit: a CPU copy of the module, or a freshly exported program."""
    if trainable.program is not None:
        return _export(trainable)
    return copy.deepcopy(trainable.module).cpu().eval()


def _export(trainable: _Trainable) -> torch.export.ExportedProgram:
    """Re-export the trained module (a CPU copy) with the original program's example inputs."""
    program = trainable.program
    args, kwargs = program.example_inputs if program.example_inputs else ((), {})
    module = copy.deepcopy(trainable.module).cpu()
    args = tuple(a.cpu() if torch.is_tensor(a) else a for a in args)
    return torch.export.export(module, args, kwargs or None)


def _save_model(trainable: _Trainable, output: Path) -> None:
    if trainable.format == "torch.export":
        program = _export(trainable)
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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _autocast(device: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with a gradient scaler)."""
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _comparison_table(before: AuditSummary, after: AuditSummary) -> Table:
    table = Table(title="audit before / after fine-tuning")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")

    def fmt(value: float | None, kind: str = "num") -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f} %" if kind == "pct" else f"{value:.3f}"

    rows = [
        ("log10 intrinsic norm (sum over chains)", before.log10_intrinsic_norm, after.log10_intrinsic_norm, "num"),
        ("max imbalance (decades)", before.max_imbalance_decades, after.max_imbalance_decades, "num"),
        ("log10 input-gradient bound", before.log10_input_gradient_bound, after.log10_input_gradient_bound, "num"),
        ("held-out accuracy", before.accuracy, after.accuracy, "pct"),
        ("held-out loss", before.loss, after.loss, "num"),
    ]
    for name, a, b, kind in rows:
        table.add_row(name, fmt(a, kind), fmt(b, kind))
    return table


def run_finetune(
    model_path: str | Path,
    data: str | Path = "digits",
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 64,
    strength: float = DEFAULT_STRENGTH,
    form: str = DEFAULT_FORM,
    device: str = "auto",
    output: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    held_out: float = 0.2,
    console: Console | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model_path` on `data` with SGD + the invariant regularizer; see the module docstring.

    `weight_decay` applies only to parameters the regularizer does not cover. Writes the model (input's
    format) to `output` (default ``<stem>.finetuned<suffix>`` beside the input), ``<output>.metrics.json``
    and the checkpoint ``<output>.ckpt``. The input file is only read.
    """
    console = console or Console(file=io.StringIO())
    model_path = Path(model_path)
    if epochs < 1 or batch_size < 1 or lr <= 0 or strength < 0 or not 0 < held_out < 1:
        raise InputError("need epochs >= 1, batch size >= 1, lr > 0, strength >= 0 and 0 < held-out < 1")
    if form not in FORMS:
        raise InputError(f"bad --form '{form}': choose {' or '.join(FORMS)}")
    output = Path(output) if output is not None else _default_output(model_path)
    if model_path.exists() and output.resolve() == model_path.resolve():
        raise InputError("--output must differ from the input model file (the input is never modified)")
    checkpoint_path = output.with_name(output.name + ".ckpt")
    metrics_path = output.with_name(output.name + ".metrics.json")
    target = _resolve_device(device)

    split = split_dataset(load_dataset(data), seed, held_out)
    example = split.train_x[:1]
    if not model_path.exists():
        raise InputError(f"no such file: {model_path}")
    digest = _file_digest(model_path)
    trainable = _load_trainable(model_path, arch, trust_pickle, example)
    if trainable.chunk is not None and trainable.chunk > split.train_x.shape[0]:
        raise InputError(f"the exported program takes batches of {trainable.chunk}, more than the training set")
    _check_shapes(trainable, split)
    config = {
        "model": str(model_path),
        "model_sha256": digest,
        "data": str(data),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "strength": strength,
        "form": form,
        "seed": seed,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "held_out": held_out,
    }

    torch.manual_seed(seed)
    module = trainable.module
    audit_input = trainable.program if trainable.program is not None else module
    from ..audit import analyze

    example = split.train_x[: trainable.chunk or 1]
    analysis = analyze(audit_input, (example,), verify=False)
    accuracy, loss = evaluate(trainable, split.val_x, split.val_y, torch.device("cpu"))
    before = _summary(analysis.report, accuracy, loss)
    module.to(target)
    if trainable.train_mode:
        module.train()

    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    regularizer = None
    if strength > 0:
        regularizer = WeightScaleRegularizer.from_analysis(analysis, module, strength=strength, form=form)
        attach(module, optimizer, regularizer=regularizer)

    start_epoch, history = 0, []
    if resume and checkpoint_path.exists():
        try:
            state = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise InputError(f"cannot read checkpoint {checkpoint_path.name}: {describe(error)}") from None
        if state.get("version") != CHECKPOINT_VERSION or state.get("config") != config:
            raise InputError(
                f"checkpoint {checkpoint_path.name} belongs to a run with other settings or another input "
                "model; rerun without --resume to start over"
            )
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], target)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        before = AuditSummary(**state["before"])
        console.print(f"resuming from {checkpoint_path.name} after epoch {start_epoch}")
    elif resume:
        console.print(f"no checkpoint {checkpoint_path.name}: starting from the beginning")

    if trainable.program is not None:
        console.print(
            "note: torch.export programs train in eval mode (BatchNorm uses running statistics, no dropout) "
            f"and take batches of {trainable.chunk}"
        )
    if regularizer is not None:
        covered = len(regularizer.coverage().covered)
        console.print(f"regularizer: form={form}, strength={strength:g}, {covered} layers covered")

    amp_dtype, scaler = _autocast(target)
    train_x, train_y = split.train_x, split.train_y
    count = train_x.shape[0]
    steps_per_epoch = math.ceil(count / batch_size)
    global_step = start_epoch * steps_per_epoch
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}  {task.fields[rate]:.0f} ex/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        for epoch in range(start_epoch, epochs):
            order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            task = progress.add_task(
                "train", total=steps_per_epoch, epoch=f"{epoch + 1}/{epochs}", loss=0.0, acc=0.0, rate=0.0
            )
            seen, correct, loss_sum, started = 0, 0, 0.0, time.perf_counter()
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                xb, yb = train_x[index].to(target), train_y[index].to(target)
                optimizer.zero_grad(set_to_none=True)
                pieces = _chunks(trainable, xb)
                used = sum(b - a for a, b in pieces)
                for a, b in pieces:
                    with torch.autocast(target.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = module(xb[a:b])
                    batch_loss = nn.functional.cross_entropy(logits.float(), yb[a:b])
                    if not torch.isfinite(batch_loss):
                        raise TrainingDiverged(
                            f"the loss became {batch_loss.item()} at epoch {epoch + 1}, step {step + 1}: "
                            "lower --lr or --strength"
                        )
                    scaled = batch_loss * ((b - a) / used)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    loss_sum += batch_loss.item() * (b - a)
                    correct += int((logits.argmax(1) == yb[a:b]).sum())
                    seen += b - a
                if pieces:
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                global_step += 1
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress.update(
                    task, advance=1, loss=loss_sum / max(seen, 1), acc=correct / max(seen, 1), rate=seen / elapsed
                )
                if step_callback is not None:
                    step_callback(global_step)
            val_acc, val_loss = evaluate(trainable, split.val_x, split.val_y, target)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": loss_sum / max(seen, 1),
                    "train_accuracy": correct / max(seen, 1),
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "penalty": float(regularizer.penalty().detach()) if regularizer is not None else 0.0,
                    "seconds": time.perf_counter() - started,
                }
            )
            progress.console.print(
                f"epoch {epoch + 1}/{epochs}: train loss {history[-1]['train_loss']:.4f}, "
                f"held-out acc {val_acc:.1%}, held-out loss {val_loss:.4f}"
            )
            state = {
                "version": CHECKPOINT_VERSION,
                "config": config,
                "epoch": epoch + 1,
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": _rng_state(target),
                "history": history,
                "before": asdict(before),
            }
            save_atomic(checkpoint_path, lambda path, state=state: torch.save(state, path))

    _save_model(trainable, output)
    val_acc, val_loss = evaluate(trainable, split.val_x, split.val_y, target)
    after = _audit_summary(_cpu_copy(trainable), example, val_acc, val_loss)
    metrics = {
        "config": config,
        "data": {"description": split.description, "train": int(count), "held_out": int(split.val_x.shape[0])},
        "device": str(target),
        "regularizer": None
        if regularizer is None
        else {
            "form": form,
            "strength": strength,
            "covered": [c.carrier for c in regularizer.coverage().covered],
            "excluded": [{"weight": e.key, "reason": e.reason} for e in regularizer.coverage().excluded],
        },
        "history": history,
        "before": asdict(before),
        "after": asdict(after),
        "output": str(output),
    }
    write_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    console.print(_comparison_table(before, after))
    console.print(f"fine-tuned model written to {output}; metrics to {metrics_path}")
    return FinetuneResult(output, metrics_path, checkpoint_path, before, after, history)
