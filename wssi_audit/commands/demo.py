"""`wssi-audit demo`: train the embedded default model on digits, save it, audit it."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_support import check_output_folder, console, handle_errors
from ..render import render_console
from .audit import report_exit_code


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @handle_errors
    def demo_command(
        output_dir: Path = typer.Option(Path("demo_out"), "--output-dir", help="Where to save the model."),
        arch: str = typer.Option("cnn", "--arch", help="Example architecture: mlp, cnn, resnet_bn, resnet_nobn."),
        epochs: int = typer.Option(15, "--epochs", min=1),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Train a small ReLU network on scikit-learn's digits for a few seconds, save it as
        .pt2, then audit it."""
        from ..auditing import analyze
        from ..demo import build_demo

        check_output_folder(output_dir, "--output-dir")
        with console.status("training on scikit-learn digits..."):
            result = build_demo(output_dir, arch, epochs, seed)
        console.print(
            f"trained [bold]{arch}[/] on digits in {result.seconds:.1f} s: test accuracy "
            f"{result.test_accuracy:.1%}; saved {result.path}"
        )
        report = analyze(result.path, seed=seed).report
        render_console(report, console)
        console.print(f"audit it again with: wssi-audit {result.path}")
        raise typer.Exit(report_exit_code(report))
