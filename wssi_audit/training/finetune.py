"""Fine-tune a model file with the invariant regularizer, resumably, on one or many processes, and
compare audits before/after.

Processes: under torchrun each process trains a DistributedDataParallel copy on its share of every
batch (a DistributedSampler); gradients are averaged across processes and the regularizer adds its
gradient once per optimizer step on every rank, so with N processes of `--batch-size B` a network
without BatchNorm ends where one process with batch N*B ends (to float tolerance; BatchNorm
normalizes per process). Rank 0 alone reads and writes files: checkpoints, the model, the metrics.

Repeatability: one seed fixes the held-out split (digits: their fixed split), every epoch's data order
(the sampler is seeded with (seed, epoch), so no state is needed to replay it) and the torch RNG
(dropout; seed + rank per process). A checkpoint written atomically after every epoch holds the
weights, the optimizer, schedule and scaler states and every rank's RNG states, so `resume` replays the
interrupted epoch exactly and ends at the same weights as an uninterrupted run (with the same number
of processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
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
from ..regularizer import (
    DEFAULT_FORM,
    DEFAULT_STRENGTH,
    FORMS,
    AttachError,
    DecoupledWeightDecayWarning,
    WeightScaleRegularizer,
    attach,
)
from .data import Data, load_data
from .distributed import ProcessGroup, join
from .optim import OPTIMIZERS, SCHEDULES, autocast_dtype, build_optimizer, build_schedule
from .trainable import (
    AuditSummary,
    Trainable,
    audit_summary,
    chunks,
    examples,
    fit_input_shape,
    forward_eval,
    load_trainable,
    save_model,
    summary,
)

CHECKPOINT_VERSION = 2
EVAL_BATCH = 512


class TrainingDiverged(WssiError):
    """The loss became NaN or infinite (exit 2): lower the learning rate or the strength."""

    exit_code = 2


class Interrupted(Exception):
    """Raised by a step callback to stop a run (tests simulate a crash with it)."""


@dataclass
class FinetuneResult:
    output: Path
    metrics: Path
    checkpoint: Path
    before: AuditSummary
    after: AuditSummary
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = None  # the trained module (unwrapped), on its training device
    world_size: int = 1
    rank: int = 0


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _default_output(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.finetuned{model_path.suffix}")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


def _loader_error(error: Exception) -> Exception:
    """An InputError raised in a DataLoader worker arrives wrapped with the worker's traceback:
    keep its own one line."""
    if isinstance(error, InputError):
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else str(error)
        return InputError(last.split("InputError: ", 1)[-1])
    return error


@dataclass
class _Loaders:
    train: torch.utils.data.DataLoader
    held_out: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler


def _loaders(data: Data, group: ProcessGroup, batch_size: int, workers: int, seed: int, chunk: int | None) -> _Loaders:
    """Training batches: a DistributedSampler (also for one process, so N processes of batch B see
    exactly the examples one process of batch N*B sees); held-out: every world-th example per rank."""
    sampler = torch.utils.data.DistributedSampler(
        data.train, num_replicas=group.world, rank=group.rank, shuffle=True, seed=seed, drop_last=False
    )
    common = {
        "num_workers": workers,
        "pin_memory": group.device.type == "cuda",
        "persistent_workers": workers > 0,
        # Its own generator: worker seeds never consume the global RNG (dropout replays exactly on resume).
        "generator": torch.Generator().manual_seed(seed),
    }
    train = torch.utils.data.DataLoader(
        data.train, batch_size=batch_size, sampler=sampler, collate_fn=data.train.collate, **common
    )
    shard = torch.utils.data.Subset(data.held_out, range(group.rank, len(data.held_out), group.world))
    held_out = torch.utils.data.DataLoader(
        shard, batch_size=chunk or EVAL_BATCH, shuffle=False, collate_fn=data.held_out.collate, **common
    )
    return _Loaders(train, held_out, sampler)


def _batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    try:
        yield from loader
    except Exception as error:
        raise _loader_error(error) from None


@torch.no_grad()
def evaluate(
    trainable: Trainable, loader: torch.utils.data.DataLoader, shape: tuple[int, ...], group: ProcessGroup
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the held-out set, in eval mode, summed over ranks; exported
    programs are fed zero-padded chunks of their batch size."""
    device = group.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y in _batches(loader):
        x = x.reshape(x.shape[0], *shape).to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        real = x.shape[0]
        if trainable.chunk and real < trainable.chunk:
            x = torch.cat([x, x.new_zeros(trainable.chunk - real, *x.shape[1:])])
        logits = forward_eval(trainable, x)[:real].float()
        sums[0] += (logits.argmax(1) == y).sum()
        sums[1] += nn.functional.cross_entropy(logits, y, reduction="sum")
        sums[2] += real
    correct, loss, count = group.sum_(sums).tolist()
    return correct / max(1.0, count), loss / max(1.0, count)


def _check_options(options: dict[str, Any]) -> None:
    o = options
    if o["epochs"] < 1 or o["batch_size"] < 1 or o["lr"] <= 0 or o["strength"] < 0:
        raise InputError("need epochs >= 1, batch size >= 1, lr > 0 and strength >= 0")
    if o["held_out"] is not None and not 0 < o["held_out"] < 1:
        raise InputError("need 0 < held-out < 1")
    if o["grad_accum"] < 1 or o["warmup_steps"] < 0 or (o["workers"] is not None and o["workers"] < 0):
        raise InputError("need --grad-accum >= 1, --warmup-steps >= 0 and --workers >= 0")
    choices = {"form": FORMS, "optimizer": tuple(OPTIMIZERS), "schedule": tuple(SCHEDULES)}
    for name, allowed in choices.items():
        if o[name] not in allowed:
            raise InputError(f"bad --{name} '{o[name]}': choose {' or '.join(allowed)}")


def _default_workers(data: Data) -> int:
    """Decoding workers for streamed image folders (in-memory tensors need none)."""
    if not data.streamed:
        return 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, (os.cpu_count() or 1) // max(1, per_node)))


def _attach(module: nn.Module, optimizer: torch.optim.Optimizer, reg: WeightScaleRegularizer, console: Console) -> Any:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DecoupledWeightDecayWarning)
        try:
            handle = attach(module, optimizer, regularizer=reg)
        except AttachError as error:
            raise InputError(f"{error} (use --strength 0 for plain fine-tuning)") from None
    for warning in caught:
        if issubclass(warning.category, DecoupledWeightDecayWarning):
            console.print(f"note: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return handle


def _config_difference(saved: dict[str, Any], config: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    return ", ".join(f"{k}: {saved.get(k)!r} there, {config.get(k)!r} now" for k in keys[:4])


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
    held_out: float | None = None,
    optimizer: str = "sgd",
    schedule: str = "constant",
    warmup_steps: int = 0,
    grad_accum: int = 1,
    amp: str = "auto",
    workers: int | None = None,
    console: Console | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model_path` on `data` with the invariant regularizer; see the module docstring.

    `batch_size` is per process and per micro-batch: one optimizer step sees
    batch_size * grad_accum * processes examples. `weight_decay` applies only to parameters the
    regularizer does not cover. Rank 0 writes the model (input's format) to `output` (default
    ``<stem>.finetuned<suffix>`` beside the input), ``<output>.metrics.json`` and the checkpoint
    ``<output>.ckpt``. The input file is only read.
    """
    options = dict(locals())
    _check_options(options)
    model_path = Path(model_path)
    output = Path(output) if output is not None else _default_output(model_path)
    if model_path.exists() and output.resolve() == model_path.resolve():
        raise InputError("--output must differ from the input model file (the input is never modified)")
    group = join(device)
    run = None
    try:
        quiet = Console(file=io.StringIO())
        run = _Run(options, model_path, output, group, (console or quiet) if group.writer else quiet)
        return run.run()
    finally:
        if run is not None:  # an exception's traceback keeps the run alive: its DDP wrapper goes now,
            run.ddp = None  # so that the group's teardown below, not interpreter exit, frees its reducer
        group.close()


class _Run:
    """One fine-tuning run in this process (one rank of it under torchrun)."""

    def __init__(
        self, options: dict[str, Any], model_path: Path, output: Path, group: ProcessGroup, console: Console
    ) -> None:
        self.o, self.model_path, self.output, self.group, self.console = options, model_path, output, group, console
        self.checkpoint_path = output.with_name(output.name + ".ckpt")
        self.metrics_path = output.with_name(output.name + ".metrics.json")

    # ------------------------------------------------------------------------------------ setup
    def _prepare(self) -> None:
        o, group = self.o, self.group
        self.data = load_data(o["data"], o["seed"], o["held_out"])
        if not self.model_path.exists():
            raise InputError(f"no such file: {self.model_path}")
        digest = _file_digest(self.model_path)
        self.trainable = trainable = load_trainable(self.model_path, o["arch"], o["trust_pickle"], self.data.sample())
        if trainable.chunk is not None and trainable.chunk > len(self.data.train):
            raise InputError(f"the exported program takes batches of {trainable.chunk}, more than the training set")
        self.shape = fit_input_shape(trainable, self.data)
        self.amp_dtype = autocast_dtype(o["amp"], group.device)
        self.workers = o["workers"] if o["workers"] is not None else _default_workers(self.data)
        self.config = {
            "model": str(self.model_path),
            "model_sha256": digest,
            "data": str(o["data"]),
            **{k: o[k] for k in ("epochs", "lr", "batch_size", "strength", "form", "seed", "weight_decay")},
            **{k: o[k] for k in ("momentum", "held_out", "optimizer", "schedule", "warmup_steps", "grad_accum")},
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "world_size": group.world,
        }

    def _build(self) -> None:
        o, group, trainable = self.o, self.group, self.trainable
        torch.manual_seed(o["seed"] + group.rank)
        module = trainable.module
        from ..auditing import analyze

        self.example = examples(self.data.train, trainable.chunk or 1, self.shape)
        audited = trainable.program if trainable.program is not None else module
        analysis = analyze(audited, (self.example,), verify=False)
        module.to(group.device)
        self.loaders = _loaders(self.data, group, o["batch_size"], self.workers, o["seed"], trainable.chunk)
        self.before = summary(analysis.report, *evaluate(trainable, self.loaders.held_out, self.shape, group))
        if trainable.train_mode:
            module.train()
        self.ddp = None
        if group.backend is not None:
            ids = [group.device.index] if group.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.optimizer = build_optimizer(o["optimizer"], module.parameters(), o["lr"], o["momentum"], o["weight_decay"])
        self.regularizer = None
        if o["strength"] > 0:
            self.regularizer = WeightScaleRegularizer.from_analysis(
                analysis, module, strength=o["strength"], form=o["form"]
            )
            _attach(module, self.optimizer, self.regularizer, self.console)
        self.steps_per_epoch = math.ceil(len(self.loaders.train) / o["grad_accum"])
        self.scheduler = build_schedule(
            self.optimizer, o["schedule"], o["epochs"] * self.steps_per_epoch, o["warmup_steps"]
        )
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(group.device.type) if fp16 else None

    def _resume(self) -> tuple[int, list[dict[str, float]]]:
        state = None
        if self.group.writer and self.checkpoint_path.exists():
            try:
                state = torch.load(str(self.checkpoint_path), map_location="cpu", weights_only=True)
            except Exception as error:
                state = {"error": f"cannot read checkpoint {self.checkpoint_path.name}: {describe(error)}"}
        state = self.group.broadcast(state)  # rank 0 alone reads; every rank gets the same state
        if state is None:
            self.console.print(f"no checkpoint {self.checkpoint_path.name}: starting from the beginning")
            return 0, []
        if "error" in state:
            raise InputError(state["error"])
        if state.get("version") != CHECKPOINT_VERSION or state.get("config") != self.config:
            difference = _config_difference(state.get("config") or {}, self.config)
            raise InputError(
                f"checkpoint {self.checkpoint_path.name} belongs to a run with other settings or another input "
                f"model ({difference or 'an older checkpoint format'}); rerun without --resume to start over"
            )
        self.trainable.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][self.group.rank], self.group.device)
        self.before = AuditSummary(**state["before"])
        self.console.print(f"resuming from {self.checkpoint_path.name} after epoch {state['epoch']}")
        return int(state["epoch"]), list(state["history"])

    # ------------------------------------------------------------------------------------- loop
    def _step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over `micro_batches` (gradient accumulation; exported programs in chunks).
        Returns the step's [loss sum, correct, examples, non-finite losses] summed over ranks, on the
        device (read one step later, so the host never waits for the device inside a step)."""
        device, trainable = self.group.device, self.trainable
        forward = self.ddp or trainable.module
        pieces = []
        for x, y in micro_batches:
            x = x.reshape(x.shape[0], *self.shape).to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            pieces += [(x[a:b], y[a:b]) for a, b in chunks(trainable, x.shape[0])]
        used = sum(int(y.shape[0]) for _, y in pieces)
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct, examples, non-finite
        for index, (x, y) in enumerate(pieces):
            last = index == len(pieces) - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = forward(x)
                loss = nn.functional.cross_entropy(logits.float(), y)
                scaled = loss * (y.shape[0] / used)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            stats[0] += loss.detach() * y.shape[0]
            stats[1] += (logits.argmax(1) == y).sum()
            stats[2] += y.shape[0]
            stats[3] += (~torch.isfinite(loss.detach())).double()
        self.group.sum_(stats)
        if pieces:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    @staticmethod
    def _checked(stats: torch.Tensor, where: str) -> torch.Tensor:
        """A step's [loss sum, correct, examples] on the CPU; TrainingDiverged if its loss was not finite."""
        loss, correct, seen, bad = stats.tolist()
        if bad > 0:
            value = loss if not math.isfinite(loss) else float("nan")
            raise TrainingDiverged(f"the loss became {value} at {where}: lower --lr or --strength")
        return torch.tensor([loss, correct, seen], dtype=torch.float64)

    def _epoch(self, epoch: int, progress: Progress, global_step: int) -> tuple[dict[str, float], int]:
        o = self.o
        self.loaders.sampler.set_epoch(epoch)
        task = progress.add_task(
            "train", total=self.steps_per_epoch, epoch=f"{epoch + 1}/{o['epochs']}", loss=0.0, acc=0.0, rate=0.0
        )
        totals = torch.zeros(3, dtype=torch.float64)
        started = time.perf_counter()
        batches = _batches(self.loaders.train)
        pending: tuple[torch.Tensor, str] | None = None
        for step in range(self.steps_per_epoch):
            micro = [batch for _, batch in zip(range(o["grad_accum"]), batches)]
            stats = self._step(micro)
            if pending is not None:  # the previous step's figures: by now the device has them
                totals += self._checked(*pending)
            pending = (stats, f"epoch {epoch + 1}, step {step + 1}")
            global_step += 1
            loss, correct, seen = totals.tolist()
            rate = seen / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, loss=loss / max(seen, 1), acc=correct / max(seen, 1), rate=rate)
            if o["step_callback"] is not None:
                o["step_callback"](global_step)
        if pending is not None:
            totals += self._checked(*pending)
        seconds = time.perf_counter() - started
        val_acc, val_loss = evaluate(self.trainable, self.loaders.held_out, self.shape, self.group)
        loss, correct, seen = totals.tolist()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "penalty": float(self.regularizer.penalty().detach()) if self.regularizer is not None else 0.0,
            "examples": int(seen),
            "seconds": seconds,
            "examples_per_second": seen / max(seconds, 1e-9),
        }
        return record, global_step

    def _save_checkpoint(self, epoch: int, history: list[dict[str, float]]) -> None:
        rng = self.group.gather(_rng_state(self.group.device))  # every rank's, for an exact resume
        if not self.group.writer:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "config": self.config,
            "epoch": epoch,
            "model": self.trainable.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng,
            "history": history,
            "before": asdict(self.before),
        }
        save_atomic(self.checkpoint_path, lambda path: torch.save(state, path))

    def _describe_start(self) -> None:
        console, trainable, data = self.console, self.trainable, self.data
        if self.group.world > 1:
            console.print(
                f"distributed: {self.group.world} processes ({self.group.backend}), batch {self.o['batch_size']} "
                f"per process, {self.o['batch_size'] * self.group.world * self.o['grad_accum']} examples per step"
            )
        if self.shape != data.sample_shape:
            console.print(f"note: examples of shape {data.sample_shape} are reshaped to the model's input {self.shape}")
        if trainable.program is not None:
            console.print(
                "note: torch.export programs train in eval mode (BatchNorm uses running statistics, no dropout) "
                f"and take batches of {trainable.chunk}"
            )
        if self.regularizer is not None:
            covered = len(self.regularizer.coverage().covered)
            settings = f"form={self.o['form']}, strength={self.o['strength']:g}"
            console.print(f"regularizer: {settings}, {covered} layers covered")

    def run(self) -> FinetuneResult:
        o = self.o
        self._prepare()
        self._build()
        start_epoch, history = self._resume() if o["resume"] else (0, [])
        self._describe_start()
        progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}  {task.fields[rate]:.0f} ex/s"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            disable=not self.group.writer,
        )
        global_step = start_epoch * self.steps_per_epoch
        with progress:
            for epoch in range(start_epoch, o["epochs"]):
                record, global_step = self._epoch(epoch, progress, global_step)
                history.append(record)
                progress.console.print(
                    f"epoch {epoch + 1}/{o['epochs']}: train loss {record['train_loss']:.4f}, held-out acc "
                    f"{record['val_accuracy']:.1%}, held-out loss {record['val_loss']:.4f}, "
                    f"{record['examples_per_second']:.0f} examples/s"
                )
                self._save_checkpoint(epoch + 1, history)
        return self._finish(history, start_epoch)

    def _finish(self, history: list[dict[str, float]], start_epoch: int) -> FinetuneResult:
        val_acc, val_loss = evaluate(self.trainable, self.loaders.held_out, self.shape, self.group)
        after = None
        if self.group.writer:
            save_model(self.trainable, self.output)
            after = audit_summary(self.trainable, self.example, val_acc, val_loss)
            self._write_metrics(history, start_epoch, after)
            self.console.print(_comparison_table(self.before, after))
            self.console.print(f"fine-tuned model written to {self.output}; metrics to {self.metrics_path}")
        after = self.group.broadcast(after)
        return FinetuneResult(
            self.output,
            self.metrics_path,
            self.checkpoint_path,
            self.before,
            after,
            history,
            self.trainable.module,
            self.group.world,
            self.group.rank,
        )

    def _write_metrics(self, history: list[dict[str, float]], start_epoch: int, after: AuditSummary) -> None:
        coverage = self.regularizer.coverage() if self.regularizer is not None else None
        ran = history[start_epoch:]
        seconds = sum(h["seconds"] for h in ran)
        metrics = {
            "config": self.config,
            "data": {
                "description": self.data.description,
                "train": len(self.data.train),
                "held_out": len(self.data.held_out),
                "example_shape": list(self.data.sample_shape),
                "model_input_shape": list(self.shape),
                "loader_workers": self.workers,
            },
            "device": str(self.group.device),
            "distributed": {"world_size": self.group.world, "backend": self.group.backend},
            "throughput": {
                "examples_per_second": sum(h["examples"] for h in ran) / seconds if seconds > 0 else None,
                "note": "training examples per second over all processes, the epochs this invocation ran",
            },
            "regularizer": None
            if coverage is None
            else {
                "form": self.o["form"],
                "strength": self.o["strength"],
                "covered": [c.carrier for c in coverage.covered],
                "excluded": [{"weight": e.key, "reason": e.reason} for e in coverage.excluded],
            },
            "history": history,
            "before": asdict(self.before),
            "after": asdict(after),
            "output": str(self.output),
        }
        write_atomic(self.metrics_path, json.dumps(metrics, indent=2) + "\n")
