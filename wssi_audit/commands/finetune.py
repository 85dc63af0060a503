"""`wssi-audit finetune MODEL --data DATA`: fine-tune with the invariant regularizer, resumably, on one
process or under torchrun (`torchrun --nproc_per_node=N -m wssi_audit finetune ...`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_support import check_output_file, console, handle_errors
from ..defaults import DEFAULT_FORM, DEFAULT_STRENGTH


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @handle_errors
    def finetune_command(
        model: Path = typer.Argument(..., help="Model file: .pt2, .pt/.pth state dict or module, .safetensors."),
        data: str = typer.Option(
            "digits",
            "--data",
            help="'digits' (bundled; the demo's fixed split), a folder of class subfolders (streamed), or .pt/.npz.",
        ),
        epochs: int = typer.Option(5, "--epochs", help="Training epochs."),
        lr: float = typer.Option(0.01, "--lr", help="Peak learning rate."),
        batch_size: int = typer.Option(64, "--batch-size", help="Examples per micro-batch and process."),
        optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9) or adamw."),
        schedule: str = typer.Option("constant", "--schedule", help="Learning rate after warm-up: constant or cosine."),
        warmup_steps: int = typer.Option(0, "--warmup-steps", help="Optimizer steps of linear warm-up."),
        grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
        amp: str = typer.Option(
            "auto", "--amp", help="Mixed precision: auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16 (CUDA), off."
        ),
        strength: float = typer.Option(DEFAULT_STRENGTH, "--strength", help="Regularizer strength (0: off)."),
        form: str = typer.Option(DEFAULT_FORM, "--form", help="Regularizer form: log or balanced."),
        weight_decay: float = typer.Option(
            5e-4, "--weight-decay", help="Weight decay for parameters the regularizer does not cover."
        ),
        held_out: float | None = typer.Option(
            None, "--held-out", help="Held-out fraction of a folder or file (default 0.2; digits: fixed split)."
        ),
        workers: int | None = typer.Option(
            None, "--workers", help="DataLoader workers (default: up to 4 for image folders, 0 for tensors)."
        ),
        device: str = typer.Option(
            "auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)."
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Fine-tuned model (default: <stem>.finetuned<suffix> beside MODEL)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint."),
        arch: str | None = typer.Option(None, "--arch", help="State dict architecture: 'package.module:factory'."),
        trust_pickle: bool = typer.Option(
            False, "--trust-pickle", help="Trust the file: allow pickles beyond tensors and code in .pt2 files."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the split, the data order and dropout."),
    ) -> None:
        """Fine-tune MODEL with the weight-scale-shift-invariant regularizer; writes the model in its
        input format, <output>.metrics.json (with examples/s) and a per-epoch checkpoint <output>.ckpt,
        and prints a before/after audit comparison. Under torchrun: DistributedDataParallel, one process
        per device, rank 0 writes."""
        from ..training.finetune import run_finetune

        if output is not None:
            check_output_file(output, "--output")
        run_finetune(
            model,
            data=data,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            strength=strength,
            form=form,
            device=device,
            output=output,
            resume=resume,
            seed=seed,
            arch=arch,
            trust_pickle=trust_pickle,
            weight_decay=weight_decay,
            held_out=held_out,
            optimizer=optimizer,
            schedule=schedule,
            warmup_steps=warmup_steps,
            grad_accum=grad_accum,
            amp=amp,
            workers=workers,
            console=console,
        )
