"""`wssi-audit balance MODEL -o OUT`: the function-preserving shift that equalizes layer norms."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..cli_support import check_output_file, console, handle_errors
from ..errors import InputError
from .audit import ARCH, IMPORTS, INPUT_SHAPE, METHOD, SEED, TRUST_PICKLE, check_trace_method, load_for_cli


def register(app: typer.Typer) -> None:
    @app.command("balance")
    @handle_errors
    def balance_command(
        model: Path = typer.Argument(..., help="Model file (same formats as audit); never modified."),
        output: Path = typer.Option(..., "--output", "-o", help="Where to write the balanced model."),
        arch: str | None = ARCH,
        input_shape: str | None = INPUT_SHAPE,
        trust_pickle: bool = TRUST_PICKLE,
        imports: list[str] = IMPORTS,
        method: str = METHOD,
        seed: int = SEED,
        residual_stream: bool = typer.Option(
            True,
            "--residual-stream/--no-residual-stream",
            help="Also balance the residual stream's scale (stem against head), when the graph allows it.",
        ),
    ) -> None:
        """Equalize the layer norms inside every homogeneous chain without changing the function.

        The balanced model has the smallest weight-decay penalty sum ||W||^2 on its shift orbit;
        the intrinsic norm (product of the layer norms) stays the same. In residual networks the
        scale of the residual stream is balanced too (stem against head), unless
        --no-residual-stream. Written in the input's
        format (.pt2, state dict, safetensors, pickled module, ONNX), after checking on an
        example input that the outputs did not change.
        """
        from ..balance import balance, check_output_suffix, save_balanced

        check_trace_method(method)
        if output.exists() and output.resolve() == model.resolve():
            raise InputError("--output must differ from the input model: the input is never modified")
        check_output_file(output, "--output")
        loaded = load_for_cli(model, arch, input_shape, trust_pickle, imports, seed)
        check_output_suffix(loaded.format, output, loaded.checkpoint)
        result = balance(loaded, method=method, seed=seed, residual_stream=residual_stream)
        written = save_balanced(result, output)

        table = Table(title=f"rebalanced {model.name}: {result.chains_balanced} chain(s)")
        for column in ("", "before", "after"):
            table.add_column(column, justify="right" if column else "left")
        table.add_row(
            "sum ||W||^2 (weight decay)", f"{result.weight_decay_before:.6g}", f"{result.weight_decay_after:.6g}"
        )
        table.add_row(
            "log10 intrinsic norm (sum over chains)",
            f"{result.log10_intrinsic_before:.6f}",
            f"{result.log10_intrinsic_after:.6f}",
        )
        table.add_row(
            "max imbalance (decades)", f"{result.max_imbalance_before:.4f}", f"{result.max_imbalance_after:.4f}"
        )
        console.print(table)
        for note in result.notes:
            console.print(f"note: {note}", highlight=False)
        console.print(
            f"outputs unchanged: max relative change {result.max_relative_error:.2e} ({result.check_dtype}); "
            f"written to {output} ({written})",
            highlight=False,
        )
