"""`wssi-audit export MODEL --onnx OUT.onnx`: write a model as ONNX (for the ONNX front-end or
deployment), atomically."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import typer

from ..cli_support import console, handle_errors, save_atomic
from ..errors import InputError, TraceError, describe
from .audit import ARCH, IMPORTS, INPUT_SHAPE, SEED, TRUST_PICKLE, load_for_cli


def export_onnx(model: Any, example_inputs: Sequence[Any], path: str | Path, opset: int | None = None) -> None:
    """Export an nn.Module with the TorchScript-based exporter (fast, offline, parameter names as
    initializer names, dynamic batch), an ExportedProgram with the torch.export-based one (the
    program's own shapes; its module cannot be re-traced by the TorchScript exporter)."""
    names = ["input"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))]
    options: dict[str, Any] = {"input_names": names, "output_names": ["output"], "opset_version": opset}
    if isinstance(model, torch.export.ExportedProgram):
        from ..frontends.torch_support import require

        require("onnx_from_program", "export the nn.Module instead (a state dict with --arch)")
        options["dynamo"] = True
    elif isinstance(model, torch.nn.Module):
        model = model.eval()
        options["dynamo"] = False
        options["dynamic_axes"] = {name: {0: "batch"} for name in [*names, "output"]}
    else:
        raise InputError(f"cannot export an object of type {type(model).__name__} to ONNX")

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if options["dynamo"]:
                # In memory, then one file: exporting to a path would put the weights in a
                # side file named after the temporary path.
                import onnx

                program = torch.onnx.export(model, tuple(example_inputs), None, verbose=False, **options)
                onnx.save(program.model_proto, tmp)
            else:
                torch.onnx.export(model, tuple(example_inputs), tmp, **options)

    try:
        save_atomic(path, write)
    except Exception as error:
        raise TraceError(f"ONNX export failed: {describe(error)}") from None


def register(app: typer.Typer) -> None:
    @app.command("export")
    @handle_errors
    def export_command(
        model: Path = typer.Argument(..., help="Model file: .pt2, .pt/.pth state dict or module, .safetensors."),
        onnx_path: Path = typer.Option(..., "--onnx", help="Where to write the ONNX model."),
        opset: int | None = typer.Option(None, "--opset", help="ONNX opset version (default: the exporter's)."),
        arch: str | None = ARCH,
        input_shape: str | None = INPUT_SHAPE,
        trust_pickle: bool = TRUST_PICKLE,
        imports: list[str] = IMPORTS,
        seed: int = SEED,
    ) -> None:
        """Export a model to ONNX; the example input fixes every dimension but the batch."""
        loaded = load_for_cli(model, arch, input_shape, trust_pickle, imports, seed)
        if loaded.format == "onnx":
            raise InputError(f"{model.name} is already an ONNX model")
        inputs = loaded.example_inputs
        if inputs is None and isinstance(loaded.model, torch.export.ExportedProgram):
            from ..frontends.torch_export import example_inputs_of

            inputs = example_inputs_of(loaded.model, seed)
        if inputs is None:
            raise InputError("exporting to ONNX needs an example input: give --input-shape")
        export_onnx(loaded.model, inputs, onnx_path, opset)
        console.print(f"ONNX model written to {onnx_path}", highlight=False)
