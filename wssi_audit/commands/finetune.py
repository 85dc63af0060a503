"""`wssi-audit finetune MODEL --data DATA`: fine-tune with the invariant regularizer, resumably."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_support import check_output_file, console, handle_errors
from ..regularizer import DEFAULT_FORM, DEFAULT_STRENGTH


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @handle_errors
    def finetune_command(
        model: Path = typer.Argument(..., help="Model file: .pt2, .pt/.pth state dict or module, .safetensors."),
        data: str = typer.Option(
            "digits", "--data", help="'digits' (bundled), a folder of class subfolders, or .pt/.npz (x, y)."
        ),
        epochs: int = typer.Option(5, "--epochs", help="Training epochs."),
        lr: float = typer.Option(0.01, "--lr", help="SGD learning rate (momentum 0.9)."),
        batch_size: int = typer.Option(64, "--batch-size", help="Examples per step."),
        strength: float = typer.Option(DEFAULT_STRENGTH, "--strength", help="Regularizer strength (0: off)."),
        form: str = typer.Option(DEFAULT_FORM, "--form", help="Regularizer form: log or balanced."),
        weight_decay: float = typer.Option(
            5e-4, "--weight-decay", help="Plain weight decay for parameters the regularizer does not cover."
        ),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N."),
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
        """Fine-tune MODEL with SGD and the weight-scale-shift-invariant regularizer; writes the model in
        its input format, <output>.metrics.json and a per-epoch checkpoint <output>.ckpt, and prints a
        before/after audit comparison."""
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
            console=console,
        )
