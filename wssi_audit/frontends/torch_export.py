"""torch.export front-end: ExportedProgram (from a .pt2 file or exported on the fly)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

from ..errors import InputError
from ..ir import Graph
from .fx_convert import FxConverter
from .fx_runner import FxRunner
from .fx_tables import SUBGRAPH_OPS


def export_module(module: nn.Module, example_inputs: Sequence[Any]) -> torch.export.ExportedProgram:
    return torch.export.export(module.eval(), tuple(example_inputs), strict=False)


CORRUPT = "the archive is corrupt or was edited"


def _user_inputs(program: torch.export.ExportedProgram) -> list[fx.Node]:
    users = set(program.graph_signature.user_inputs)
    return [node for node in program.graph.nodes if node.op == "placeholder" and node.name in users]


def _check_saved_inputs(program: torch.export.ExportedProgram, args: Sequence[torch.Tensor]) -> None:
    """The archive's sample inputs must be what the program was traced with (count, dtype, static
    sizes): the runs would otherwise measure another input than the bounds were computed for."""
    placeholders = _user_inputs(program)
    if len(args) != len(placeholders):
        raise InputError(
            f"the archive's sample inputs are {len(args)} tensors "
            f"for a program of {len(placeholders)} inputs: {CORRUPT}"
        )
    for node, arg in zip(placeholders, args):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        recorded = ["?" if not isinstance(d, int) else d for d in value.shape]
        if (
            arg.dtype != value.dtype
            or arg.dim() != value.dim()
            or any(d != "?" and d != n for d, n in zip(recorded, arg.shape))
        ):
            raise InputError(
                f"the archive's sample input {node.name} is {tuple(arg.shape)} {str(arg.dtype).replace('torch.', '')}, "
                f"the program was traced with {tuple(recorded)} {str(value.dtype).replace('torch.', '')}: {CORRUPT}"
            )


def example_inputs_of(program: torch.export.ExportedProgram, seed: int = 0) -> tuple[Any, ...] | None:
    """Inputs for verification: the saved example inputs (checked against the traced inputs), else
    random ones of the traced shapes."""
    saved = getattr(program, "example_inputs", None)
    if saved is not None:
        if not (isinstance(saved, tuple) and len(saved) == 2 and isinstance(saved[0], (tuple, list))):
            raise InputError("the archive's sample inputs are not an (args, kwargs) pair: the archive is corrupt")
        args, kwargs = saved
        if not kwargs and all(torch.is_tensor(a) for a in args):
            _check_saved_inputs(program, args)
            return tuple(args)
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for node in _user_inputs(program):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        shape = [int(d) if isinstance(d, int) else int(getattr(d, "node", d).hint or 2) for d in value.shape]
        if value.dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator, dtype=value.dtype))
        else:
            inputs.append(torch.zeros(shape, dtype=value.dtype))
    return tuple(inputs)


def _subgraph_call(node: fx.Node, owner: nn.Module) -> tuple[fx.GraphModule, list[Any]] | None:
    """(body, operands) when `node` runs a subgraph under a context (autocast, grad mode)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    if node.target.name() not in SUBGRAPH_OPS:
        return None
    for index, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            body = getattr(owner, str(arg.target), None)
            if isinstance(body, fx.GraphModule):
                return body, list(node.args[index + 1 :])
    return None


def inline_subgraphs(graph_module: fx.GraphModule) -> fx.Graph:
    """The program's graph with every context-wrapped subgraph copied in place of its call.

    torch.export writes a `with torch.autocast(...)` or `torch.no_grad()` block of forward as a
    higher-order op whose body is a GraphModule; the ops inside are ordinary ops to analyse.
    """
    if not any(_subgraph_call(node, graph_module) for node in graph_module.graph.nodes):
        return graph_module.graph
    flat = fx.Graph()
    flat.output(_copy_inlined(graph_module.graph, graph_module, flat, {}))
    return flat


def _copy_inlined(graph: fx.Graph, owner: nn.Module, into: fx.Graph, env: dict[fx.Node, Any]) -> Any:
    """Copy `graph`'s nodes into `into` (env: original node -> copy), inlining subgraph calls;
    returns the copied output value."""
    for node in graph.nodes:
        if node in env:
            continue
        if node.op == "output":
            return fx.node.map_arg(node.args[0], lambda n: env[n])
        call = _subgraph_call(node, owner)
        if call is not None:
            body, operands = call
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            inner = {ph: fx.node.map_arg(arg, lambda n: env[n]) for ph, arg in zip(placeholders, operands)}
            result = _copy_inlined(body.graph, body, into, inner)
            env[node] = tuple(result) if isinstance(result, (list, tuple)) else (result,)
            continue
        if node.op == "get_attr" and isinstance(getattr(owner, str(node.target), None), fx.GraphModule):
            env[node] = None  # a subgraph reference, used only by the calls inlined above
            continue
        producer = node.args[0] if node.op == "call_function" and node.args else None
        if node.target is operator.getitem and isinstance(env.get(producer), tuple):
            env[node] = env[producer][node.args[1]]
            continue
        env[node] = into.node_copy(node, lambda n: env[n])
    return None


# Inputs a plain program reads as tensors; anything else (a mutation output, a token, a custom object)
# is left to torch's own unlifting.
_STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def unlifted_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a module that holds its tensors (get_attr at their state_dict keys) and takes
    the user inputs: what the runner runs. Built here for a program that only reads its tensors and
    returns user outputs; `program.module()` otherwise (it imports torch._dynamo: a second)."""
    signature = program.graph_signature
    plain = all(
        spec.kind in (*_STATE_KINDS, InputKind.USER_INPUT) and isinstance(spec.arg, TensorArgument)
        for spec in signature.input_specs
    ) and all(spec.kind is OutputKind.USER_OUTPUT for spec in signature.output_specs)
    if not plain:
        return program.module()
    tensors = {**program.state_dict, **(getattr(program, "constants", None) or {})}
    root = nn.Module()
    for name, child in program.graph_module.named_children():  # subgraphs of wrapped regions
        root.add_module(name, child)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, signature.input_specs):
        if spec.kind in _STATE_KINDS:
            if spec.target not in tensors:
                return program.module()
            _set_tensor(root, spec.target, tensors[spec.target], buffer=spec.kind is not InputKind.PARAMETER)
            env[node] = graph.get_attr(spec.target)
        else:
            env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in program.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(root, graph)


def _set_tensor(root: nn.Module, target: str, value: torch.Tensor, buffer: bool) -> None:
    *path, leaf = target.split(".")
    owner = root
    for part in path:
        if not isinstance(getattr(owner, part, None), nn.Module):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if buffer:
        owner.register_buffer(leaf, value.detach())
    else:
        owner.register_parameter(leaf, value if isinstance(value, nn.Parameter) else nn.Parameter(value))


def trace_export(
    program: torch.export.ExportedProgram, example_inputs: Sequence[Any] | None, method: str = "export"
) -> Graph:
    signature = program.graph_signature
    param_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    constants = getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {}
    param_of.update(constants)
    graph = inline_subgraphs(program.graph_module)
    tensor_nodes, shapes = set(), {}
    for node in graph.nodes:
        value = node.meta.get("val")
        leaves, _ = torch.utils._pytree.tree_flatten(value)
        if any(isinstance(leaf, torch.Tensor) for leaf in leaves):
            tensor_nodes.add(node.name)
        if isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape):
            shapes[node.name] = list(value.shape)
    tensors: dict[str, torch.Tensor] = {k: v.detach() for k, v in program.state_dict.items()}
    for key, value in getattr(program, "constants", {}).items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach()
    # Buffers and constants are fixed, not trained (a blur filter); a program converted from
    # TorchScript lifts its parameters as buffers, so there nothing is known to be fixed.
    fixed_keys = set(signature.inputs_to_buffers.values()) | set(constants.values())
    fixed = {k: tensors[k] for k in fixed_keys if k in tensors} if signature.inputs_to_parameters else {}
    converter = FxConverter(None, param_of, tensor_nodes, fixed=fixed, shapes=shapes)
    nodes = converter.convert(graph)
    runner = None
    if example_inputs is not None:
        runner = FxRunner(unlifted_module(program), example_inputs, absorbed=converter.absorbed)
    return Graph(nodes, tensors, method, [], runner)
