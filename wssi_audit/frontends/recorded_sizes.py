"""Does a torch.export program compute the sizes it records, and does one run of it fit in memory?

The certified bound reads each value's size from the program's record, and the runs allocate what
the operators compute. A crafted file can make the two disagree, record a weight with other
sizes or strides than its payload, or ask for a conv padding of thousands: gigabytes of
activations from a few kilobytes. One pass over the graph on the meta device (sizes only, nothing
allocated, nothing run) computes every value's size from the real weights and sample inputs,
compares it with the record and adds up what a float64 run would hold. An operator that has no
meta kernel, or whose output size depends on the data, keeps its recorded size.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_flatten

from ..errors import InputError, describe, shorten
from ..safe_archive import check_run_fits
from .torch_export import CORRUPT, inline_subgraphs
from .window_sizes import WINDOW_RULES, refuse

STATE_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
# Operators that read a value (.item()): the meta device has none, and the record is all there is.
VALUE_READS = frozenset({"_local_scalar_dense"})


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")


def _recorded(node: fx.Node) -> Any:
    """The node's recorded value with static sizes as meta tensors; None where a size is symbolic."""

    def twin(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if not all(type(n) is int for n in (*value.shape, *value.stride())):
                return None
            return _meta(value)
        if isinstance(value, (list, tuple)):
            return type(value)(twin(v) for v in value)
        return value

    return twin(node.meta.get("val"))


def _describe(value: torch.Tensor | Any) -> str:
    if not isinstance(value, torch.Tensor):
        return repr(value)
    return f"{tuple(int(n) if type(n) is int else '?' for n in value.shape)} {str(value.dtype).replace('torch.', '')}"


def _check_weight(name: str, tensor: torch.Tensor, node: fx.Node) -> None:
    """A weight's payload must be the tensor the graph was traced with: sizes, dtype, strides
    (strides of dimensions longer than 1; the others never move a read)."""
    if tensor.device.type == "meta":
        raise InputError(f"weight {name} is saved on the meta device: it holds no values, {CORRUPT}")
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return
    same = tensor.dtype == value.dtype and tuple(tensor.shape) == tuple(value.shape)
    same = same and all(
        n < 2 or s == r for n, s, r in zip(tensor.shape, tensor.stride(), value.stride()) if type(r) is int
    )
    if not same:
        raise InputError(
            shorten(
                f"weight {name} is stored as {_describe(tensor)} (strides {tuple(tensor.stride())}), the program "
                f"records {_describe(value)} (strides {tuple(value.stride())}): {CORRUPT}"
            )
        )


def _same_sizes(computed: Any, recorded: Any) -> bool:
    """Every size the record states (symbolic ones are free) equals the computed one; a value that
    could not be computed (None: a recorded symbolic size) is not compared."""
    ours, _ = tree_flatten(computed, is_leaf=lambda x: x is None)
    theirs, _ = tree_flatten(recorded, is_leaf=lambda x: x is None)
    if len(ours) != len(theirs):
        return computed is None
    for mine, their in zip(ours, theirs):
        if isinstance(their, torch.Tensor) and mine is not None:
            if not isinstance(mine, torch.Tensor) or mine.dim() != their.dim():
                return False
            if any(type(r) is int and r != c for c, r in zip(mine.shape, their.shape)):
                return False
    return True


def _held_bytes(target: Any, value: Any) -> int:
    """Bytes a float64 run holds for a new value (a view of another value holds none)."""
    returns = getattr(getattr(target, "_schema", None), "returns", ())
    if any(getattr(r, "alias_info", None) is not None for r in returns):
        return 0
    leaves, _ = tree_flatten(value)
    total = 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            size = 16 if leaf.dtype.is_complex else 8 if leaf.dtype.is_floating_point else leaf.element_size()
            total += leaf.numel() * size
    return total


def _broadcast(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """Elementwise: the tensor operands' sizes broadcast."""
    operands = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
    return _broadcast_shapes(*(operand.shape for operand in operands))


def _broadcast_shapes(*shapes: Sequence[int]) -> list[int]:
    """torch.broadcast_shapes, whose first call imports sympy (0.27 s): sizes aligned at the end,
    each axis the operands' common size where the others have 1."""
    result = [1] * max((len(shape) for shape in shapes), default=0)
    for shape in shapes:
        for axis, size in enumerate(shape, start=len(result) - len(shape)):
            if result[axis] == 1:
                result[axis] = size
            elif size not in (1, result[axis]):
                refuse(f"sizes {[tuple(s) for s in shapes]} do not broadcast")
    return result


def _channel_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """batch_norm and its kin (input, weight, bias, running_mean, running_var, ...): the input's
    sizes; each per-channel tensor given holds one entry per channel (dimension 1)."""
    x = args[0]
    if x.dim() < 2:
        refuse(f"a normalization over channels of an input of {tuple(x.shape)}")
    return _per_channel(x, args[1:5])


def _per_channel(x: torch.Tensor, tensors: Sequence[Any]) -> list[int]:
    """The input's sizes, once each tensor given holds one value per channel (dimension 1)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() != x.shape[1]:
            refuse(f"{t.numel()} per-channel values for {x.shape[1]} channels")
    return list(x.shape)


def _layer_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """(input, normalized_shape, weight, bias, ...): the input's sizes, which must end in
    normalized_shape, as weight and bias must be."""
    x, shape = args[0], list(args[1])
    if not shape or list(x.shape[x.dim() - len(shape) :]) != shape or len(shape) > x.dim():
        refuse(f"normalized shape {shape} for an input of {tuple(x.shape)}")
    for t in args[2:4]:
        if isinstance(t, torch.Tensor) and list(t.shape) != shape:
            refuse(f"an affine tensor of {tuple(t.shape)} for normalized shape {shape}")
    return list(x.shape)


def _group_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """(input, num_groups, weight, bias, ...): the input's sizes; the groups divide the channels."""
    x, groups = args[0], args[1]
    if x.dim() < 2 or groups < 1 or x.shape[1] % groups:
        refuse(f"{groups} groups for an input of {tuple(x.shape)}")
    return _per_channel(x, args[2:4])


def _native_group_norm(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """(input, weight, bias, N, C, HxW, group, eps): the input's sizes, which N, C, HxW describe."""
    x, n, c, hw, groups = args[0], *args[3:7]
    if x.numel() != n * c * hw or (x.dim() > 1 and x.shape[1] != c) or groups < 1 or c % groups:
        refuse(f"N {n}, C {c}, HxW {hw}, {groups} groups for an input of {tuple(x.shape)}")
    return list(x.shape)


def _along_dim(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """softmax and log_softmax (input, dim, ...): the input's sizes; dim names one of its axes
    (torch's meta kernels let any dim pass, its kernels do not)."""
    x, dim = args[0], kwargs.get("dim", args[1])
    rank = max(x.dim(), 1)
    if not -rank <= dim < rank:
        refuse(f"dim {dim} of an input of {tuple(x.shape)}")
    return list(x.shape)


def _roll(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """(input, shifts, dims): the input's sizes; one shift per named dimension (or one, for none)."""
    x = args[0]
    shifts = list(args[1]) if isinstance(args[1], (list, tuple)) else [args[1]]
    dims = list(args[2]) if len(args) > 2 and isinstance(args[2], (list, tuple)) else list(args[2:3])
    rank = max(x.dim(), 1)
    if (len(shifts) != len(dims) if dims else len(shifts) != 1) or any(not -rank <= d < rank for d in dims):
        refuse(f"shifts {shifts} along dims {dims} of an input of {tuple(x.shape)}")
    return list(x.shape)


def _attention(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """softmax(q k^T) v: the queries' sizes with the values' last one."""
    query, key, value = args[:3]
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        refuse(f"queries {tuple(query.shape)}, keys {tuple(key.shape)}, values {tuple(value.shape)}")
    return [
        *_broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]),
        query.shape[-2],
        value.shape[-1],
    ]


def _cat(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """Concatenation: the operands' sizes, added along `dim` (1-d empty operands skipped, as torch does)."""
    operands = [t for t in args[0] if not (t.dim() == 1 and t.shape[0] == 0)]
    if not operands:
        return [0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    rank = operands[0].dim()
    if not -rank <= dim < rank or any(t.dim() != rank for t in operands):
        refuse(f"cannot concatenate sizes {[tuple(t.shape) for t in operands]} along dim {dim}")
    dim %= rank
    shape = list(operands[0].shape)
    for t in operands[1:]:
        if any(a != b for d, (a, b) in enumerate(zip(shape, t.shape)) if d != dim):
            refuse(f"cannot concatenate sizes {[tuple(t.shape) for t in operands]} along dim {dim}")
    shape[dim] = sum(t.shape[dim] for t in operands)
    return shape


def _linear(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """x A^T + b: the input's sizes with the last one replaced by the weight's rows."""
    x, weight = args[0], args[1]
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        refuse(f"input {tuple(x.shape)} does not match a weight of {tuple(weight.shape)}")
    shape = [*x.shape[:-1], weight.shape[0]]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(bias, torch.Tensor) and _broadcast_shapes(bias.shape, shape) != shape:
        refuse(f"a bias of {tuple(bias.shape)} for outputs of {tuple(shape)}")
    return shape


def _adaptive_pool(spatial: int) -> Any:
    """Adaptive pooling over `spatial` axes of a batched or unbatched input: the input's leading
    sizes, then the requested output size."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
        x, size = args[0], list(args[1])
        if len(size) != spatial or x.dim() not in (spatial + 1, spatial + 2) or any(n < 0 for n in size):
            refuse(f"output size {size} for an input of {tuple(x.shape)}")
        if any(n == 0 for n in x.shape[-spatial:]):
            refuse(f"an empty spatial axis in an input of {tuple(x.shape)}")
        return [*x.shape[: x.dim() - spatial], *size]

    return rule


def _reduce(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
    """A reduction over `dim` (all dimensions when none are named), kept as 1 with `keepdim`."""
    x = args[0]
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keep = bool(kwargs.get("keepdim", args[2] if len(args) > 2 else False))
    rank = max(x.dim(), 1)
    named = [dims] if isinstance(dims, int) else list(dims or range(rank))
    if any(not -rank <= d < rank for d in named):
        refuse(f"dims {dims} for an input of {tuple(x.shape)}")
    reduced = {d % rank for d in named}
    if len(reduced) != len(named):
        refuse(f"a dimension named twice in {dims}")
    return [1 if d in reduced else n for d, n in enumerate(x.shape) if keep or d not in reduced]


# Output sizes of operators whose meta kernels are Python decompositions: those import torch._dynamo
# on first use (a second; pt2_reader exists to avoid it), or sympy through torch._check (0.27 s:
# convolutions and pooling, window_sizes). Elementwise operators go by their tag.
SIZE_RULES: dict[str, Any] = {
    **WINDOW_RULES,
    **dict.fromkeys(
        ("batch_norm", "instance_norm", "native_batch_norm", "_native_batch_norm_legit",
         "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"),
        _channel_norm,
    ),
    "layer_norm": _layer_norm,
    "native_layer_norm": _layer_norm,
    "group_norm": _group_norm,
    "native_group_norm": _native_group_norm,
    "roll": _roll,
    **dict.fromkeys(("softmax", "_softmax", "log_softmax", "_log_softmax"), _along_dim),
    "cat": _cat,
    "linear": _linear,
    "adaptive_avg_pool2d": _adaptive_pool(2),
    "adaptive_avg_pool3d": _adaptive_pool(3),
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "scaled_dot_product_attention": _attention,
}  # fmt: skip


WINDOW_ARGUMENTS = frozenset({"stride", "padding", "dilation", "output_padding"})


def _check_window_arguments(target: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """A convolution's stride, padding, dilation and output padding give one value, or one per
    spatial axis: torch's kernels refuse other lengths, its meta kernels let them pass."""
    if "conv" not in target._opname:
        return
    named = {a.name: v for a, v in zip(target._schema.arguments, args)} | kwargs
    weight = named.get("weight")
    if not isinstance(weight, torch.Tensor):
        return
    axes = weight.dim() - 2
    for name in WINDOW_ARGUMENTS & named.keys():
        value = named[name]
        if isinstance(value, (list, tuple)) and len(value) not in (1, axes):
            refuse(f"{name} {list(value)} for a convolution over {axes} axes")


def _writes_first_argument(target: torch._ops.OpOverload) -> bool:
    schema = target._schema
    if len(schema.returns) != 1 or not schema.arguments:
        return False
    written, returned = schema.arguments[0].alias_info, schema.returns[0].alias_info
    return bool(written and written.is_write and returned and returned.before_set == written.before_set)


def _size_rule(node: fx.Node, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The value of an operator with a size rule: output 0 computed, any other output as recorded."""
    rule = _broadcast if torch.Tag.pointwise in node.target.tags else SIZE_RULES[node.target._opname]
    shape = rule(args, kwargs)
    recorded = _recorded(node)
    first = recorded[0] if isinstance(recorded, (list, tuple)) else recorded
    dtype = first.dtype if isinstance(first, torch.Tensor) else torch.float32
    value = torch.empty(shape, dtype=dtype, device="meta")
    if isinstance(recorded, (list, tuple)):
        return type(recorded)((value, *recorded[1:]))
    return value


def _run_on_meta(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """The node's value on the meta device; its recorded value where that cannot be computed."""
    missing = False

    def lookup(arg: fx.Node) -> Any:
        nonlocal missing
        value = env.get(arg)
        missing = missing or value is None
        return value

    args = fx.node.map_arg(node.args, lookup)
    kwargs = fx.node.map_arg(node.kwargs, lookup)
    if node.target is operator.getitem and not missing and isinstance(args[0], (list, tuple)):
        return args[0][args[1]]
    if missing or not isinstance(node.target, torch._ops.OpOverload) or node.target._opname in VALUE_READS:
        return _recorded(node)
    if _writes_first_argument(node.target):  # relu_, hardswish_: the value is its input
        return args[0]
    try:
        if torch.Tag.pointwise in node.target.tags or node.target._opname in SIZE_RULES:
            return _size_rule(node, args, kwargs)
        _check_window_arguments(node.target, args, kwargs)
        return node.target(*args, **kwargs)
    except NotImplementedError:  # no meta kernel, or a size that depends on the values (nonzero)
        return _recorded(node)
    except Exception as error:
        raise InputError(
            shorten(f"node {node.name}: {_call_text(node.target, args, kwargs)} fails: {describe(error)}: {CORRUPT}")
        ) from None


def _call_text(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """aten.conv2d.default(tensor<1x1x8x8>, tensor<4x1x3x3>, None, [0, 0]): the call, tensors by sizes."""

    def text(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor<{'x'.join(map(str, value.shape))}>"
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            return "[" + ", ".join(map(text, value)) + "]"
        return repr(value)

    parts = [text(a) for a in args] + [f"{k}={text(v)}" for k, v in kwargs.items()]
    return f"{target}({', '.join(parts)})"


def check_recorded_sizes(
    program: torch.export.ExportedProgram, inputs: Sequence[Any] | None, memory: int | None = None
) -> None:
    """Raise `InputError` when a recorded size is not what the operators compute from the weights
    and `inputs`, or when a float64 run would hold more than half of `memory` (default: this
    machine's). Nothing is checked without inputs (then nothing runs either)."""
    if inputs is None:
        return
    signature = program.graph_signature
    state = {**program.state_dict, **(getattr(program, "constants", None) or {})}
    graph = inline_subgraphs(program.graph_module)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    users = iter(inputs)
    env: dict[fx.Node, Any] = {}
    held = 0
    for node, spec in zip(placeholders, signature.input_specs):
        if spec.kind in STATE_KINDS and isinstance(state.get(spec.target), torch.Tensor):
            _check_weight(spec.target, state[spec.target], node)
            env[node] = _meta(state[spec.target])
        elif spec.kind is InputKind.USER_INPUT:
            value = next(users, None)
            env[node] = _meta(value) if isinstance(value, torch.Tensor) else _recorded(node)
            held += _held_bytes(None, env[node])
        else:
            env[node] = _recorded(node)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        value = _run_on_meta(node, env)
        if not _same_sizes(value, node.meta.get("val")):
            raise InputError(
                shorten(
                    f"value {node.name} ({node.target}) is recorded as {_describe(node.meta.get('val'))}, "
                    f"its operator computes {_describe(value)}: {CORRUPT}"
                )
            )
        env[node] = value
        held += _held_bytes(node.target, value)
    check_run_fits(held, "this program at its sample input", "export it with a smaller sample input", memory)
