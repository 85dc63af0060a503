"""torch.export front-end: ExportedProgram (from a .pt2 file or exported on the fly)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..ir import Graph
from .fx_convert import FxConverter
from .fx_runner import FxRunner


def export_module(module: nn.Module, example_inputs: Sequence[Any]) -> torch.export.ExportedProgram:
    return torch.export.export(module.eval(), tuple(example_inputs), strict=False)


def example_inputs_of(program: torch.export.ExportedProgram, seed: int = 0) -> tuple[Any, ...] | None:
    """Inputs for verification: the saved example inputs, else random ones of the traced shapes."""
    saved = getattr(program, "example_inputs", None)
    if saved is not None:
        args, kwargs = saved
        if not kwargs and all(torch.is_tensor(a) for a in args):
            return tuple(args)
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in program.graph_signature.user_inputs:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        shape = [int(d) if isinstance(d, int) else int(getattr(d, "node", d).hint or 2) for d in value.shape]
        if value.dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator, dtype=value.dtype))
        else:
            inputs.append(torch.zeros(shape, dtype=value.dtype))
    return tuple(inputs)


def trace_export(
    program: torch.export.ExportedProgram, example_inputs: Sequence[Any] | None, method: str = "export"
) -> Graph:
    signature = program.graph_signature
    param_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    constants = getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {}
    param_of.update(constants)
    tensor_nodes = set()
    for node in program.graph.nodes:
        leaves, _ = torch.utils._pytree.tree_flatten(node.meta.get("val"))
        if any(isinstance(leaf, torch.Tensor) for leaf in leaves):
            tensor_nodes.add(node.name)
    converter = FxConverter(None, param_of, tensor_nodes)
    nodes = converter.convert(program.graph)
    tensors: dict[str, torch.Tensor] = {k: v.detach() for k, v in program.state_dict.items()}
    for key, value in getattr(program, "constants", {}).items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach()
    runner = FxRunner(program.module(), example_inputs) if example_inputs is not None else None
    return Graph(nodes, tensors, method, [], runner)
