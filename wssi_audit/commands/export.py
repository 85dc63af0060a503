"""`wssi-audit export MODEL --onnx OUT.onnx`: write a model as ONNX (for the ONNX front-end or
deployment), atomically."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import typer

from ..cli_support import check_output_file, console, debug_enabled, handle_errors, save_atomic
from ..errors import InputError, TraceError, describe
from .audit import ARCH, IMPORTS, INPUT_SHAPE, SEED, TRUST_PICKLE, load_for_cli

# Loggers that print tracebacks while exporting (onnxscript's version converter, torch.onnx).
EXPORT_LOGGERS = ("onnxscript", "torch.onnx", "onnx_ir")


def supported_opsets(model: Any) -> range:
    """What torch.onnx says its exporter for `model` supports: the torch.export-based exporter
    (ExportedProgram) from its torchlib opset up, the TorchScript-based one (nn.Module) up to its
    own maximum."""
    import torch
    from torch.onnx import _constants

    if isinstance(model, torch.export.ExportedProgram):
        from torch.onnx._internal.exporter import _constants as dynamo

        return range(dynamo.TORCHLIB_OPSET, _constants.ONNX_MAX_OPSET + 1)
    return range(_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1)


def check_opset(model: Any, opset: int | None) -> None:
    import torch

    if opset is None:
        return
    try:
        supported = supported_opsets(model)
    except (ImportError, AttributeError):  # a torch without these constants: the exporter decides
        return
    if opset not in supported:
        kind = "torch.export" if isinstance(model, torch.export.ExportedProgram) else "TorchScript"
        raise InputError(
            f"--opset {opset} is outside what torch.onnx's {kind}-based exporter supports "
            f"({supported.start}-{supported.stop - 1})"
        )


@contextlib.contextmanager
def _exporter_output_captured() -> Iterator[None]:
    """The exporters print to the process's stdout/stderr from C++ (an IR dump on failure) and log
    tracebacks: all of it goes to a scratch file, shown only with --debug."""
    if debug_enabled():
        yield
        return
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    ctypes.CDLL(None).fflush(None)  # C stdio buffers belong to the sink
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _written_opset(path: str) -> int | None:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def export_onnx(model: Any, example_inputs: Sequence[Any], path: str | Path, opset: int | None = None) -> None:
    """Export an nn.Module with the TorchScript-based exporter (fast, offline, parameter names as
    initializer names, dynamic batch), an ExportedProgram with the torch.export-based one (the
    program's own shapes; its module cannot be re-traced by the TorchScript exporter)."""
    import torch

    names = ["input"] if len(example_inputs) == 1 else [f"input_{i}" for i in range(len(example_inputs))]
    options: dict[str, Any] = {"input_names": names, "output_names": ["output"], "opset_version": opset}
    if isinstance(model, torch.export.ExportedProgram):
        options["dynamo"] = True
    elif isinstance(model, torch.nn.Module):
        model = model.eval()
        options["dynamo"] = False
        options["dynamic_axes"] = {name: {0: "batch"} for name in [*names, "output"]}
    else:
        raise InputError(f"cannot export an object of type {type(model).__name__} to ONNX")

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), _exporter_output_captured():
            warnings.simplefilter("ignore")
            if options["dynamo"]:
                # In memory, then one file: exporting to a path would put the weights in a
                # side file named after the temporary path.
                import onnx

                program = torch.onnx.export(model, tuple(example_inputs), None, verbose=False, **options)
                onnx.save(program.model_proto, tmp)
            else:
                torch.onnx.export(model, tuple(example_inputs), tmp, **options)
        written = _written_opset(tmp)
        if opset is not None and written != opset:
            raise TraceError(f"ONNX export wrote opset {written}, not the requested --opset {opset}")

    check_opset(model, opset)
    try:
        save_atomic(path, write)
    except (TraceError, InputError):
        raise
    except Exception as error:
        raise TraceError(f"ONNX export failed: {describe(error)}") from None


def _static(loaded: Any) -> Any:
    """A converted TorchScript program has a symbolic size for every dimension, which its ONNX
    export keeps and `audit` cannot fill in: re-exported at the example input's shapes."""
    import torch

    if loaded.format != "torchscript":
        return loaded.model
    try:
        return torch.export.export(loaded.model.module(), tuple(loaded.example_inputs), strict=False)
    except Exception as error:
        raise TraceError(f"cannot re-export the converted TorchScript program: {describe(error)}") from None


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
        import torch

        from ..frontends import _check_runs as check_runs

        if onnx_path.suffix.lower() != ".onnx":
            raise InputError(f"--onnx {onnx_path} must end with .onnx (audit reads ONNX models by that name)")
        check_output_file(onnx_path, "--onnx")
        loaded = load_for_cli(model, arch, input_shape, trust_pickle, imports, seed)
        if loaded.format == "onnx":
            raise InputError(f"{model.name} is already an ONNX model")
        inputs = loaded.example_inputs
        if inputs is None and isinstance(loaded.model, torch.export.ExportedProgram):
            from ..frontends.torch_export import example_inputs_of

            inputs = example_inputs_of(loaded.model, seed)
        if inputs is None:
            raise InputError("exporting to ONNX needs an example input: give --input-shape")
        check_opset(loaded.model, opset)
        check_runs(loaded.model, inputs)  # a wrong --input-shape is an input error, not an export failure
        export_onnx(_static(loaded), inputs, onnx_path, opset)
        console.print(f"ONNX model written to {onnx_path}", highlight=False)
