"""`wssi-audit audit MODEL` (also plain `wssi-audit MODEL`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..cli_support import check_output_file, console, handle_errors, write_atomic
from ..errors import EXIT_INCONSISTENT, EXIT_OK, EXIT_RULE_FAILED, InputError
from ..render import render_console, render_markdown
from ..report import Report

if TYPE_CHECKING:  # the commands import torch when they run, not when --help is shown
    import torch

    from ..loading import LoadedModel


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    markdown = "markdown"


# Options shared by every command that loads a model.
ARCH = typer.Option(None, "--arch", help="Architecture for a state dict: 'package.module:factory'.")
INPUT_SHAPE = typer.Option(
    None, "--input-shape", help="Example input shape, e.g. 1,3,32,32 (several inputs: ';'-separated)."
)
TRUST_PICKLE = typer.Option(
    False, "--trust-pickle", help="Trust the file: allow pickles beyond tensors and code in .pt2/TorchScript files."
)
IMPORTS = typer.Option([], "--import", help="Import a module first (makes pickled classes or factories importable).")
METHOD = typer.Option("auto", "--trace", help="How to trace an nn.Module: auto, fx or export.")
SEED = typer.Option(0, "--seed", help="Seed of the random inputs and the random scale shifts.")
MEASURE = typer.Option(
    True,
    "--measure/--no-measure",
    help="Measure ||dy/dx|| at the example input (3 backward passes and 3 Jacobian-vector products).",
)
DATA = typer.Option(
    None,
    "--data",
    help="Measure ||dy/dx|| at real examples instead: 'digits', a folder of class subfolders, or a .pt/.npz.",
)
DATA_EXAMPLES = typer.Option(16, "--data-examples", min=1, help="How many held-out examples --data measures at.")


def measure_points(data: str | None, examples: int) -> torch.Tensor | None:
    """The first `examples` held-out examples of `data` as one batch (None without --data)."""
    if data is None:
        return None
    import torch

    from ..training.data import load_data

    held_out = load_data(data).held_out
    count = min(examples, len(held_out))
    if count == 0:
        raise InputError(f"--data {data} has no held-out examples to measure at")
    return torch.stack([held_out[i][0] for i in range(count)])


def check_trace_method(method: str) -> None:
    """--trace is validated here once for every command that traces."""
    from ..frontends import METHODS

    if method not in METHODS:
        raise InputError(f"bad --trace '{method}': choose {', '.join(METHODS)}")


def load_for_cli(
    model: Path,
    arch: str | None,
    input_shape: str | None,
    trust_pickle: bool,
    imports: list[str],
    seed: int,
    for_analysis: bool = False,
) -> LoadedModel:
    from ..loading import load_model, parse_input_shape, random_inputs

    inputs = random_inputs(parse_input_shape(input_shape), seed)
    return load_model(
        model, arch=arch, trust_pickle=trust_pickle, imports=imports, example_inputs=inputs, for_analysis=for_analysis
    )


def register(app: typer.Typer) -> None:
    @app.command("audit")
    @handle_errors
    def audit_command(
        model: Path = typer.Argument(..., help="Model file: .pt2, .pt/.pth state dict or module, .safetensors, .onnx."),
        arch: str | None = ARCH,
        input_shape: str | None = INPUT_SHAPE,
        trust_pickle: bool = TRUST_PICKLE,
        imports: list[str] = IMPORTS,
        method: str = METHOD,
        output_format: OutputFormat = typer.Option(
            OutputFormat.table, "--format", "-f", help="table, json or markdown."
        ),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the report here instead of stdout."),
        layers: bool = typer.Option(False, "--layers", help="Also show the per-layer table."),
        explain: bool = typer.Option(False, "--explain", help="Add a glossary: what each number means."),
        plot: Path | None = typer.Option(
            None, "--plot", help="Also write a PNG: layer norms by depth, imbalance, gradient figures."
        ),
        html: Path | None = typer.Option(None, "--html", help="Also write a standalone HTML report with the figures."),
        verify: bool = typer.Option(
            True, "--verify/--no-verify", help="Check every chain by weight scale shifts, with a control."
        ),
        measure: bool = MEASURE,
        data: str | None = DATA,
        data_examples: int = DATA_EXAMPLES,
        seed: int = SEED,
    ) -> None:
        """Trace a model, find its homogeneous chains and residual blocks, report norms in log10.

        Exit codes: 0 ok; 1 an error-level finding (e.g. NaN weights); 2 usage or input error;
        3 analysis inconsistency (a chain failed its self-check)."""
        check_trace_method(method)
        for path, option in ((output, "--output"), (plot, "--plot"), (html, "--html")):
            if path is not None:
                check_output_file(path, option)
        if plot is not None or html is not None:
            from ..plots import require_matplotlib

            require_matplotlib()  # before the work, not after it
        from ..auditing import analyze

        points = measure_points(data, data_examples) if measure else None
        loaded = load_for_cli(model, arch, input_shape, trust_pickle, imports, seed, for_analysis=True)
        report = analyze(loaded, method=method, verify=verify, measure=measure, seed=seed, measure_on=points).report
        write_pictures(report, plot, html)
        if output_format is OutputFormat.json:
            text = report.to_json() + "\n"
        elif output_format is OutputFormat.markdown:
            text = render_markdown(report)
        else:
            text = None
        if output is not None:
            if text is None:
                from ..render import render_text

                text = render_text(report, layers=layers, explain=explain)
            write_atomic(output, text)
            console.print(f"report written to {output}")
        elif text is not None:
            typer.echo(text, nl=False)
        else:
            render_console(report, console, layers=layers, explain=explain)
        raise typer.Exit(report_exit_code(report))


def write_pictures(report: Report, plot: Path | None, html: Path | None) -> None:
    """--plot and --html: rendered first, then written atomically (never a partial file)."""
    if plot is None and html is None:
        return
    from ..plots import figure_png, report_html

    if plot is not None:
        write_atomic(plot, figure_png(report))
        console.print(f"figure written to {plot}", highlight=False)
    if html is not None:
        write_atomic(html, report_html(report))
        console.print(f"HTML report written to {html}", highlight=False)


def report_exit_code(report: Report) -> int:
    """3 for an analysis inconsistency, 1 for an error-level finding (a broken model), else 0."""
    if report.inconsistent:
        return EXIT_INCONSISTENT
    if any(finding.severity == "error" for finding in report.findings):
        return EXIT_RULE_FAILED
    return EXIT_OK
