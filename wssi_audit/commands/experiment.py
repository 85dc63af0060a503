"""`wssi-audit experiment`: the paper's claims, measured on real data (see docs/results.md)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import typer

from ..cli_support import check_output_folder, console, handle_errors
from ..errors import InputError


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    @handle_errors
    def experiment_command(
        quick: bool = typer.Option(False, "--quick", help="Tiny grid: a smoke test (under 3 minutes)."),
        device: str = typer.Option("cpu", "--device", help="cpu, or cuda for the larger grid."),
        output: Path = typer.Option(Path("wssi-experiment"), "--output", help="Folder for tables, plots, raw JSON."),
        workers: int | None = typer.Option(None, "--workers", min=1, help="Processes (default: 2 on CPU)."),
        seeds: int | None = typer.Option(None, "--seeds", min=1, help="Seeds per cell (default: 5)."),
    ) -> None:
        """Train every architecture x arm x regime of the grid, pick each arm's strength on a
        validation split, and write results.md with tables and plots (docs/results.md shows ours)."""
        import torch

        from ..experiments import default_config, large_config, quick_config, run_experiments

        check_output_folder(output, "--output")

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available on this machine")
        if quick:
            config = replace(quick_config(), device=device)
        elif device != "cpu":
            config = large_config(device)
        else:
            config = default_config()
        overrides = {"workers": workers, "seeds": seeds}
        config = replace(
            config,
            output=str(output),
            markdown=str(output / "results.md"),
            **{k: v for k, v in overrides.items() if v is not None},
        )
        start = time.perf_counter()
        run_experiments(
            config, progress=lambda message: console.print(f"[{time.perf_counter() - start:7.1f}s] {message}")
        )
        console.print(f"wrote {config.markdown} and {config.output}/")
