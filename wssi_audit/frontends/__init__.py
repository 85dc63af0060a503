"""Front-ends: anything -> the internal `Graph`. Analyses never import from here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError, TraceError, describe
from ..ir import Graph
from .torch_export import example_inputs_of, export_module, trace_export
from .torch_fx import trace_fx

METHODS = ("auto", "fx", "export")


def graph_from_module(module: nn.Module, example_inputs: Sequence[Any] | None, method: str = "auto") -> Graph:
    """Trace an nn.Module: FX first (untraceable parts as leaves), torch.export as fallback."""
    if method not in METHODS:
        raise TraceError(f"unknown trace method '{method}' (choose from {', '.join(METHODS)})")
    module = module.eval()
    count = sum(p.numel() for p in module.parameters())
    fx_graph: Graph | None = None
    fx_error: BaseException | None = None
    if method in ("auto", "fx"):
        try:
            fx_graph = trace_fx(module, example_inputs)
        except Exception as error:
            fx_error = error
        if fx_graph is not None and (fx_graph.method == "fx" or method == "fx" or example_inputs is None):
            fx_graph.parameter_count = count
            return fx_graph
    if example_inputs is None:
        raise TraceError(
            f"symbolic tracing failed ({describe(fx_error)}); "
            "give an example input shape (--input-shape) so that torch.export can be tried"
        )
    try:
        program = export_module(module, example_inputs)
    except Exception as error:
        if fx_graph is not None:
            fx_graph.parameter_count = count
            return fx_graph
        reason = f"symbolic tracing failed ({describe(fx_error)}); " if fx_error else ""
        raise TraceError(f"{reason}torch.export failed ({describe(error)})") from None
    graph = trace_export(program, example_inputs, method="export")
    graph.parameter_count = count
    return graph


def graph_from_program(program: torch.export.ExportedProgram, example_inputs: Sequence[Any] | None) -> Graph:
    inputs = example_inputs if example_inputs is not None else example_inputs_of(program)
    graph = trace_export(program, inputs, method="torch.export")
    keys = list(program.graph_signature.inputs_to_parameters.values())
    if not keys:  # converted TorchScript lifts parameters as buffers: count all but BN statistics
        statistics = ("running_mean", "running_var", "num_batches_tracked")
        keys = [k for k in program.state_dict if not k.endswith(statistics)]
    graph.parameter_count = sum(program.state_dict[k].numel() for k in keys)
    return graph


def _check_runs(model: Any, example_inputs: Sequence[Any]) -> None:
    """A wrong input shape is the user's input error, said in one line before any tracing.

    Fake tensors first (shapes only: a real ResNet-50 forward at 224x224 takes longer than the
    whole analysis); only when that fails does the model run for real to decide.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    runnable = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        with torch.no_grad(), mode:
            runnable(*fake_inputs)
        return
    except Exception:  # decided by the real run below
        pass
    try:
        with torch.no_grad():
            runnable(*example_inputs)
    except Exception as error:
        shapes = ";".join(",".join(map(str, x.shape)) for x in example_inputs if torch.is_tensor(x))
        raise InputError(f"the model does not run on inputs of shape {shapes}: {describe(error)}") from None


def build_graph(model: Any, example_inputs: Sequence[Any] | None = None, method: str = "auto") -> Graph:
    if isinstance(model, Graph):
        return model
    if isinstance(model, nn.Module):
        model.eval()  # analysed in eval mode anyway; a training-mode check run would update BN statistics
    if example_inputs is not None and isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        _check_runs(model, example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        return graph_from_program(model, example_inputs)
    if isinstance(model, nn.Module):
        return graph_from_module(model, example_inputs, method)
    if type(model).__name__ == "ModelProto":  # onnx, imported only when an ONNX model is given
        from .onnx_frontend import graph_from_onnx

        return graph_from_onnx(model, example_inputs)
    raise TraceError(f"cannot analyse an object of type {type(model).__name__}")
