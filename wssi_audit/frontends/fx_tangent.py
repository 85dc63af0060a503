"""Jacobian-vector products J w of an fx GraphModule without autograd, for the measured gradient.

`linearize` runs the graph forward once and keeps, per op, only what its linearization at that
point needs: ReLU's result (its mask), max pooling's indices, eval
BatchNorm's per-channel scale, the slope of a piecewise-linear op. Each J w is then one pass
applying those linear maps to w (a convolution without its bias, a masked product): about one
forward, where differentiating autograd's backward once more costs three to four.

Each rule applies the transpose of what autograd's backward applies at the same point, conventions
at ties included: ReLU masks where its result > 0 with threshold_backward, its backward's own
kernel; max pooling routes through max_pool2d_with_indices' indices, which its backward scatters
into; leaky ReLU, hardtanh and clamp take their slopes from autograd itself. So u . (J w) = (J^T u) . w holds to float32
rounding, and analysis/gradient.py checks it on every product. Rules are rows of tables keyed by
ATen packet (torch.export graphs), by function or Tensor method (symbolic traces) and by exact
module type (a subclass may override forward). An op without a row, a module in training mode, a
write into a tensor that is read again: `linearize` returns None and the analysis differentiates
autograd's backward instead. No rule is guessed.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

Tangents = dict[fx.Node, Any]  # node -> its tangent (a tensor, or a tuple for a tuple-valued op)
Step = Callable[[Tangents], Any]


class Decline(Exception):
    """The graph has an op this interpreter has no rule for, or one it cannot follow safely."""


class _Site:
    """One call node during the forward pass: its primal arguments, which of them vary with the
    input, and how to call its op (as the graph runs it, and without the in-place write)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        node: fx.Node,
        values: dict[fx.Node, Any],
        varying: set[fx.Node],
        interpreter: fx.Interpreter,
        pure: Callable[..., Any] | None = None,
    ) -> None:
        self.gm, self.node, self.values, self.varying, self.interpreter = gm, node, values, varying, interpreter
        if node.op == "call_module":
            self.module: nn.Module | None = gm.get_submodule(str(node.target))
            self.function: Callable[..., Any] = self.module
        elif node.op == "call_method":
            self.module, name = None, str(node.target)
            self.function = lambda this, *args, **kwargs: getattr(this, name)(*args, **kwargs)
        else:
            self.module, self.function = None, node.target
        self.pure = pure or self.function  # the out-of-place twin of an in-place ATen op

    def value(self, argument: Any) -> Any:
        """The primal value of an argument expression (nodes inside replaced by their values)."""
        return map_arg(argument, lambda n: self.values[n])

    def varies(self, argument: Any) -> bool:
        found: list[fx.Node] = []
        map_arg(argument, found.append)
        return any(n in self.varying for n in found)

    def first(self) -> fx.Node:
        """The first positional argument, when it varies and no other argument does (an op linear
        in it, its other arguments weights and settings)."""
        args = self.node.args
        if not args or not isinstance(args[0], fx.Node) or args[0] not in self.varying:
            raise Decline(f"{self.node.name}: only its first argument may vary")
        if self.varies(args[1:]) or self.varies(dict(self.node.kwargs)):
            raise Decline(f"{self.node.name}: a second argument varies")
        return args[0]

    def argument(self, position: int, name: str, default: Any = None) -> Any:
        """An argument given by position or by keyword (unevaluated: a node stays a node)."""
        if position < len(self.node.args):
            return self.node.args[position]
        return self.node.kwargs.get(name, default)

    def run(self) -> Any:
        return self.interpreter.run_node(self.node)

    def call_with(self, replaced: dict[fx.Node, Any]) -> Any:
        """The op on the primal arguments with some nodes replaced by other values."""
        lookup = lambda n: replaced[n] if n in replaced else self.values[n]  # noqa: E731
        args, kwargs = map_arg(self.node.args, lookup), map_arg(dict(self.node.kwargs), lookup)
        return self.function(*args, **kwargs)


Rule = Callable[[_Site], tuple[Any, Step]]  # (the node's primal value, its tangent step)


@dataclass(frozen=True)
class _Row:
    rule: Rule
    fresh: bool  # the result is new storage (a view or the input itself is not)


def _with(site: _Site, replacements: Sequence[tuple[int, str, Any]]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The node's arguments, first one left out, with some replaced (a bias dropped), evaluated."""
    args, kwargs = list(site.node.args), dict(site.node.kwargs)
    for position, name, replacement in replacements:
        if position < len(args):
            args[position] = replacement
        elif name in kwargs:
            kwargs[name] = replacement
    return site.value(tuple(args[1:])), site.value(kwargs)


def _applied(*replacements: tuple[int, str, Any]) -> Rule:
    """An op linear in its first argument once its offset is dropped (`replacements`: bias -> None,
    a pad value -> 0): the tangent is the same op on the tangent."""

    def rule(site: _Site) -> tuple[Any, Step]:
        source = site.first()
        args, kwargs = _with(site, replacements)
        function = site.pure
        return site.run(), lambda tangents: function(tangents[source], *args, **kwargs)

    return rule


class _Mask:
    """ReLU's tangent step: autograd's backward kernel, threshold_backward(grad, result, 0) (grad
    where result > 0, else 0), applied to the tangent. It holds the result itself, no mask to
    build: a later write into the result is declined (autograd's backward, which reads it too,
    refuses such a graph as well)."""

    def __init__(self, source: fx.Node, result: torch.Tensor) -> None:
        self.source, self.result = source, result.detach()  # the storage, not autograd's graph of it

    def __call__(self, tangents: Tangents) -> torch.Tensor:
        return torch.ops.aten.threshold_backward.default(tangents[self.source], self.result, 0)


def _relu(site: _Site) -> tuple[Any, Step]:
    source = site.first()
    value = site.run()
    return value, _Mask(source, value)


def _slope(site: _Site) -> tuple[Any, Step]:
    """An elementwise piecewise-linear op (leaky ReLU, hardtanh, clamp): its derivative at each
    entry taken from autograd's own backward of the op, so that ties follow autograd's convention."""
    source = site.first()
    primal = site.values[source]
    with torch.enable_grad():
        leaf = primal.detach().requires_grad_()
        result = site.call_with({source: leaf.clone()})  # an in-place op writes the copy
        if not torch.is_tensor(result) or result.shape != primal.shape:
            raise Decline(f"{site.node.name}: not elementwise")
        (slope,) = torch.autograd.grad(result.sum(), leaf)  # a grad_outputs seed would import sympy
    return site.run(), lambda tangents: tangents[source] * slope


def _indices(site: _Site, value: Any) -> tuple[torch.Tensor, bool]:
    """Max pooling's indices (flat over each plane), and whether the node returns them too."""
    if isinstance(value, tuple):  # max_pool2d_with_indices, adaptive_max_pool2d, return_indices=True
        return value[1], True
    target, module = site.node.target, site.module
    if isinstance(module, nn.MaxPool2d):
        x = site.values[site.node.args[0]]
        pooled = F.max_pool2d(
            x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True
        )
        return pooled[1], False
    if isinstance(module, nn.AdaptiveMaxPool2d):
        return F.adaptive_max_pool2d(site.values[site.node.args[0]], module.output_size, True)[1], False
    position = 6 if target is F.max_pool2d else 2  # return_indices
    args, kwargs = list(site.value(site.node.args)), dict(site.value(dict(site.node.kwargs)))
    if position < len(args):
        args[position] = True
    else:
        kwargs["return_indices"] = True
    return target(*args, **kwargs)[1], False


def _max_pool(site: _Site) -> tuple[Any, Step]:
    """Max pooling routes each output to the input entry its indices name: a gather, the
    transpose of the scatter its backward does with the same indices."""
    source = site.first()
    if site.module is not None and site.node.kwargs:
        raise Decline(f"{site.node.name}: module called with keywords")
    if site.node.target is torch.ops.aten.max_pool2d.default:
        # the same arguments as the with_indices op, whose first result is this one's value (the
        # entry each index names): one pooling, not a second for the indices; autograd's backward
        # then scatters through these very indices
        value, indices = torch.ops.aten.max_pool2d_with_indices.default(
            *site.value(site.node.args), **site.value(dict(site.node.kwargs))
        )
        pair = False
    else:
        value = site.run()
        with torch.no_grad():  # indices only: nothing for autograd to record
            indices, pair = _indices(site, value)
    flat = indices.flatten(-2)

    def step(tangents: Tangents) -> Any:
        pooled = tangents[source].flatten(-2).gather(-1, flat).view(indices.shape)
        return (pooled, None) if pair else pooled

    return value, step


_BATCH_NORM_SIGNATURES = {  # name -> position, per calling convention
    "aten": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    "aten_no_training": ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
    "functional": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
}


def _batch_norm(site: _Site) -> tuple[Any, Step]:
    """Eval-mode BatchNorm is x -> (x - mean) * weight / sqrt(var + eps) + bias: its tangent is the
    per-channel scale. Batch statistics (training, or no running statistics) make it no such map."""
    source = site.first()
    module = site.module
    if module is not None:
        if site.node.kwargs or module.training or module.running_var is None:
            raise Decline(f"{site.node.name}: BatchNorm with batch statistics")
        weight, variance, eps = module.weight, module.running_var, module.eps
    else:
        target = site.node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target._schema.name.split("::")[-1]
            names = _BATCH_NORM_SIGNATURES["aten_no_training" if name.endswith("no_training") else "aten"]
        else:
            names = _BATCH_NORM_SIGNATURES["functional"]
        named = dict(zip(names, site.node.args))
        named.update({k: v for k, v in site.node.kwargs.items() if k in names})
        if names is not _BATCH_NORM_SIGNATURES["aten_no_training"] and named.get("training", False) is not False:
            raise Decline(f"{site.node.name}: BatchNorm with batch statistics")
        weight, variance = site.value(named.get("weight")), site.value(named.get("running_var"))
        eps = float(named.get("eps", 1e-5))
    if not torch.is_tensor(variance):
        raise Decline(f"{site.node.name}: BatchNorm without running statistics")
    value = site.run()
    primal = site.values[source]
    scale = 1 / torch.sqrt(variance + eps)  # native_batch_norm_backward in eval: grad * invstd * weight
    if weight is not None:
        scale = scale * weight
    if primal.dim() < 2 or scale.numel() != primal.shape[1]:
        raise Decline(f"{site.node.name}: BatchNorm over an unexpected shape")
    scale = scale.reshape(1, -1, *([1] * (primal.dim() - 2))).to(primal.dtype).detach()
    if isinstance(value, tuple):
        return value, lambda tangents: (tangents[source] * scale, None, None)
    return value, lambda tangents: tangents[source] * scale


def _fit(tangent: torch.Tensor, like: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
    """A tangent broadcast and cast as its op's result is (x + bias, x * a float64 scalar). `like`:
    the result's shape and dtype, not the result (a step holding it keeps its memory alive)."""
    shape, dtype = like
    if tangent.shape != shape:
        tangent = tangent.expand(shape)
    return tangent if tangent.dtype == dtype else tangent.to(dtype)


def _arithmetic(kind: str) -> Rule:
    """add/sub/rsub of tangents (alpha as given), mul and div by a constant, neg."""

    def rule(site: _Site) -> tuple[Any, Step]:
        args, kwargs = site.node.args, dict(site.node.kwargs)
        if kind == "neg":
            source = site.first()
            return site.run(), lambda tangents: -tangents[source]
        summed = kind in ("add", "sub", "rsub")
        if not 2 <= len(args) <= (3 if summed else 2) or set(kwargs) - {"alpha", "rounding_mode"}:
            raise Decline(f"{site.node.name}: unexpected arguments")
        a, b = args[0], args[1]
        alpha = args[2] if len(args) > 2 else kwargs.get("alpha", 1)
        if kwargs.get("rounding_mode") is not None:  # floor/trunc division is piecewise constant
            raise Decline(f"{site.node.name}: not linear")
        if isinstance(alpha, fx.Node):
            raise Decline(f"{site.node.name}: alpha computed in the graph")
        a_varies, b_varies = site.varies(a), site.varies(b)
        value = site.run()
        like = (value.shape, value.dtype)
        if summed:
            coefficient = {"add": (1, alpha), "sub": (1, -alpha), "rsub": (-alpha, 1)}[kind]

            def step(tangents: Tangents) -> Any:
                terms = [
                    tangents[x] if c == 1 else tangents[x] * c
                    for x, c, v in ((a, coefficient[0], a_varies), (b, coefficient[1], b_varies))
                    if v
                ]
                return _fit(terms[0] + terms[1] if len(terms) == 2 else terms[0], like)

            return value, step
        if kind == "mul" and a_varies != b_varies:
            source, factor = (a, site.value(b)) if a_varies else (b, site.value(a))
            return value, lambda tangents: _fit(tangents[source] * factor, like)
        if kind == "div" and a_varies and not b_varies:
            divisor = site.value(b)
            return value, lambda tangents: _fit(tangents[a] / divisor, like)
        raise Decline(f"{site.node.name}: a product or quotient of two varying values")

    return rule


def _bilinear(site: _Site) -> tuple[Any, Step]:
    """mm / matmul / bmm with one varying operand: the same product with its tangent."""
    args = site.node.args
    if len(args) != 2 or site.node.kwargs:
        raise Decline(f"{site.node.name}: unexpected arguments")
    a_varies, b_varies = site.varies(args[0]), site.varies(args[1])
    if a_varies == b_varies:
        raise Decline(f"{site.node.name}: a product of two varying values")
    source = args[0] if a_varies else args[1]
    if not isinstance(source, fx.Node):
        raise Decline(f"{site.node.name}: unexpected arguments")
    other = site.value(args[1] if a_varies else args[0])
    function = site.pure
    if a_varies:
        return site.run(), lambda tangents: function(tangents[source], other)
    return site.run(), lambda tangents: function(other, tangents[source])


def _addmm(site: _Site) -> tuple[Any, Step]:
    """beta * self + alpha * mat1 @ mat2 with one varying factor (self may vary too)."""
    args, kwargs = site.node.args, dict(site.node.kwargs)
    if len(args) != 3 or set(kwargs) - {"beta", "alpha"}:
        raise Decline(f"{site.node.name}: unexpected arguments")
    bias, first, second = args
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    first_varies, second_varies = site.varies(first), site.varies(second)
    if first_varies == second_varies or isinstance(beta, fx.Node) or isinstance(alpha, fx.Node):
        raise Decline(f"{site.node.name}: not linear in one factor")
    other = site.value(second if first_varies else first)
    source = first if first_varies else second
    bias_varies = site.varies(bias) and beta != 0
    value = site.run()
    like = (value.shape, value.dtype)

    def step(tangents: Tangents) -> Any:
        product = torch.mm(tangents[source], other) if first_varies else torch.mm(other, tangents[source])
        if alpha != 1:
            product = product * alpha
        if bias_varies:
            product = product + (tangents[bias] if beta == 1 else tangents[bias] * beta)
        return _fit(product, like)

    return value, step


def _joined(site: _Site) -> tuple[Any, Step]:
    """cat / stack: the tangents joined the same way, zeros for the constant pieces."""
    pieces = site.node.args[0] if site.node.args else None
    if not isinstance(pieces, (list, tuple)) or site.varies(site.node.args[1:]) or site.varies(dict(site.node.kwargs)):
        raise Decline(f"{site.node.name}: unexpected arguments")
    parts = [(p, None) if site.varies(p) else (None, torch.zeros_like(site.value(p))) for p in pieces]
    if any(p is not None and not isinstance(p, fx.Node) for p, _ in parts):
        raise Decline(f"{site.node.name}: unexpected arguments")
    rest, kwargs = site.value(tuple(site.node.args[1:])), site.value(dict(site.node.kwargs))
    function = site.pure

    def step(tangents: Tangents) -> Any:
        return function([tangents[p] if p is not None else zero for p, zero in parts], *rest, **kwargs)

    return site.run(), step


def _getitem(site: _Site) -> tuple[Any, Step]:
    """An item of a tuple-valued op, or a tensor indexed by constants (a linear view)."""
    container, index = site.node.args
    if not isinstance(container, fx.Node) or site.varies(index):
        raise Decline(f"{site.node.name}: index computed from the input")
    index = site.value(index)
    value = site.run()
    if isinstance(site.values[container], (tuple, list)):

        def item(tangents: Tangents) -> Any:
            held = tangents[container]
            return None if held is None else held[index]

        return value, item
    return value, lambda tangents: tangents[container][index]


def _dropout(site: _Site) -> tuple[Any, Step]:
    """Dropout outside training is the identity (native_dropout also returns a mask)."""
    source = site.first()
    target, module = site.node.target, site.module
    if module is not None:
        active = module.training
    elif target is F.dropout or target in (F.dropout1d, F.dropout2d, F.dropout3d):
        active = site.argument(2, "training", True)
    else:
        active = site.argument(2, "train", True)
    if active is not False:
        raise Decline(f"{site.node.name}: dropout in training mode")
    value = site.run()
    if isinstance(value, tuple):
        return value, lambda tangents: (tangents[source], None)
    return value, lambda tangents: tangents[source]


def _identity(site: _Site) -> tuple[Any, Step]:
    source = site.first()
    return site.run(), lambda tangents: tangents[source]


def _module_linear(site: _Site) -> tuple[Any, Step]:
    """Conv and Linear modules without their bias; parameter-free linear modules as they are."""
    source = site.first()
    module = site.module
    if len(site.node.args) != 1 or site.node.kwargs:
        raise Decline(f"{site.node.name}: module called with more than its input")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        weight = module.weight
        step: Step = lambda tangents: module._conv_forward(tangents[source], weight, None)  # noqa: E731
    elif isinstance(module, nn.Linear):
        weight = module.weight
        step = lambda tangents: F.linear(tangents[source], weight)  # noqa: E731
    elif isinstance(module, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        padding = module.padding
        step = lambda tangents: F.pad(tangents[source], padding, "constant", 0.0)  # noqa: E731
    else:
        if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
            raise Decline(f"{site.node.name}: module with tensors of its own")
        step = lambda tangents: module(tangents[source])  # noqa: E731
    return site.run(), step


_VIEW, _COPY = _Row(_applied(), fresh=False), _Row(_applied(), fresh=True)
_WITHOUT_BIAS = _Row(_applied((2, "bias", None)), fresh=True)
_RELU, _SLOPE, _MAX_POOL = _Row(_relu, True), _Row(_slope, True), _Row(_max_pool, True)
_BATCH_NORM, _DROPOUT, _JOINED = _Row(_batch_norm, True), _Row(_dropout, False), _Row(_joined, True)
_BILINEAR, _ADDMM = _Row(_bilinear, True), _Row(_addmm, True)
_ARITHMETIC = {kind: _Row(_arithmetic(kind), True) for kind in ("add", "sub", "rsub", "mul", "div", "neg")}

# ATen overload packets (torch.export graphs); in-place ops are looked up as their out-of-place twin.
ATEN_RULES: dict[str, _Row] = {
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "linear"), _WITHOUT_BIAS),
    **dict.fromkeys(
        (
            "avg_pool1d",
            "avg_pool2d",
            "avg_pool3d",
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
            "_adaptive_avg_pool2d",
            "_adaptive_avg_pool3d",
            "mean",
            "sum",
            "clone",
            "index_select",
            "reflection_pad1d",
            "reflection_pad2d",
            "reflection_pad3d",
            "replication_pad1d",
            "replication_pad2d",
            "replication_pad3d",
        ),
        _COPY,
    ),
    **dict.fromkeys(
        (
            "view",
            "reshape",
            "_unsafe_view",
            "flatten",
            "unflatten",
            "permute",
            "transpose",
            "t",
            "squeeze",
            "unsqueeze",
            "expand",
            "slice",
            "select",
            "contiguous",
            "alias",
        ),
        _VIEW,
    ),
    "constant_pad_nd": _Row(_applied((2, "value", 0.0)), fresh=True),
    "pad": _Row(_applied((3, "value", None)), fresh=True),  # None: zeros in constant mode; the others take none
    "relu": _RELU,
    **dict.fromkeys(("leaky_relu", "hardtanh", "relu6", "clamp", "clamp_min", "clamp_max"), _SLOPE),
    **dict.fromkeys(("max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d"), _MAX_POOL),
    **dict.fromkeys(("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"), _BATCH_NORM),
    **_ARITHMETIC,
    **dict.fromkeys(("mm", "matmul", "bmm"), _BILINEAR),
    "addmm": _ADDMM,
    **dict.fromkeys(("cat", "concat", "stack"), _JOINED),
    **dict.fromkeys(("dropout", "feature_dropout", "native_dropout"), _DROPOUT),
}

# Functions a symbolic trace records (torch.nn.functional, torch, operator), by identity.
FUNCTION_RULES: dict[Callable[..., Any], _Row] = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d, F.linear), _WITHOUT_BIAS),
    **dict.fromkeys(
        (
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            torch.mean,
            torch.sum,
            torch.clone,
        ),
        _COPY,
    ),
    **dict.fromkeys(
        (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze), _VIEW
    ),
    F.pad: _Row(_applied((3, "value", None)), fresh=True),
    **dict.fromkeys((F.relu, torch.relu, F.relu_, torch.relu_), _RELU),
    **dict.fromkeys((F.leaky_relu, F.hardtanh, F.relu6, torch.clamp, torch.clamp_min, torch.clamp_max), _SLOPE),
    **dict.fromkeys((F.max_pool2d, F.adaptive_max_pool2d), _MAX_POOL),
    F.batch_norm: _BATCH_NORM,
    **dict.fromkeys((F.dropout, F.dropout1d, F.dropout2d, F.dropout3d), _DROPOUT),
    **dict.fromkeys((torch.cat, torch.concat, torch.stack), _JOINED),
    **dict.fromkeys((torch.matmul, operator.matmul, torch.mm, torch.bmm), _BILINEAR),
    torch.addmm: _ADDMM,
    **{f: _ARITHMETIC["add"] for f in (operator.add, torch.add, operator.iadd)},
    **{f: _ARITHMETIC["sub"] for f in (operator.sub, torch.sub, operator.isub)},
    **{f: _ARITHMETIC["mul"] for f in (operator.mul, torch.mul, operator.imul)},
    **{f: _ARITHMETIC["div"] for f in (operator.truediv, torch.div, operator.itruediv)},
    **{f: _ARITHMETIC["neg"] for f in (operator.neg, torch.neg)},
    operator.getitem: _Row(_getitem, fresh=False),
}
# Functions that write into their first argument, and those that do when passed inplace=True (at this position).
_WRITING_FUNCTIONS = frozenset({F.relu_, torch.relu_, operator.iadd, operator.isub, operator.imul, operator.itruediv})
_INPLACE_FLAG: dict[Callable[..., Any], int] = {F.relu: 1, F.leaky_relu: 2, F.hardtanh: 3, F.relu6: 1}

# Tensor methods, by name; a trailing underscore writes into the tensor.
METHOD_RULES: dict[str, _Row] = {
    **dict.fromkeys(
        ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze", "expand"), _VIEW
    ),
    "contiguous": _VIEW,
    **dict.fromkeys(("clone", "mean", "sum"), _COPY),
    **dict.fromkeys(("relu", "relu_"), _RELU),
    **dict.fromkeys(("clamp", "clamp_min", "clamp_max"), _SLOPE),
    **{name: _ARITHMETIC[name.rstrip("_")] for name in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")},
    "neg": _ARITHMETIC["neg"],
    **dict.fromkeys(("matmul", "mm", "bmm"), _BILINEAR),
}

# Modules, by exact type: a subclass may compute something else in its forward.
_MODULE = _Row(_module_linear, fresh=True)
MODULE_RULES: dict[type[nn.Module], _Row] = {
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), _MODULE),
    **dict.fromkeys(
        (
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.ZeroPad1d,
            nn.ZeroPad2d,
            nn.ZeroPad3d,
            nn.ConstantPad1d,
            nn.ConstantPad2d,
            nn.ConstantPad3d,
            nn.ReflectionPad1d,
            nn.ReflectionPad2d,
            nn.ReflectionPad3d,
            nn.ReplicationPad1d,
            nn.ReplicationPad2d,
            nn.ReplicationPad3d,
        ),
        _MODULE,
    ),
    **dict.fromkeys((nn.Flatten, nn.Unflatten), _Row(_module_linear, fresh=False)),
    nn.ReLU: _RELU,
    **dict.fromkeys((nn.LeakyReLU, nn.Hardtanh, nn.ReLU6), _SLOPE),
    **dict.fromkeys((nn.MaxPool2d, nn.AdaptiveMaxPool2d), _MAX_POOL),
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), _BATCH_NORM),
    **dict.fromkeys((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), _DROPOUT),
    nn.Identity: _Row(_identity, fresh=False),
}

# Calls that read their arguments and write nothing (a value without floating point is constant).
_READ_ONLY_FUNCTIONS = frozenset({builtins.getattr, builtins.len, torch._assert})
_READ_ONLY_METHODS = frozenset({"size", "dim", "numel", "__len__"})


def _row(gm: fx.GraphModule, node: fx.Node) -> tuple[_Row | None, bool, Callable[..., Any] | None]:
    """(the node's rule row, whether it writes into its first argument, the out-of-place ATen twin
    it is computed with)."""
    from .fx_runner import _out_of_place_variant

    target = node.target
    if node.op == "call_module":
        module = gm.get_submodule(str(target))
        return MODULE_RULES.get(type(module)), bool(getattr(module, "inplace", False)), None
    if node.op == "call_method":
        return METHOD_RULES.get(str(target)), str(target).endswith("_"), None
    if isinstance(target, torch._ops.OpOverload):
        twin = None
        if target._schema.is_mutable:
            twin = _out_of_place_variant(target)
            if twin is None:
                return None, True, None
        name = (twin or target)._schema.name.split("::")[-1]
        return ATEN_RULES.get(name), twin is not None, twin
    try:
        row = FUNCTION_RULES.get(target)  # type: ignore[arg-type]
    except TypeError:  # an unhashable target
        return None, False, None
    position = _INPLACE_FLAG.get(target)  # type: ignore[arg-type]
    writes = target in _WRITING_FUNCTIONS or (
        position is not None
        and bool(node.args[position] if position < len(node.args) else node.kwargs.get("inplace", False))
    )
    return row, writes, None


def _read_only(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The call writes into none of its arguments (known to, not assumed)."""
    from .fx_runner import _is_guards, _writes_nothing

    if node.op == "call_module":
        return _is_guards(gm.get_submodule(str(node.target)))
    if node.op == "call_method":
        return str(node.target) in _READ_ONLY_METHODS
    return _writes_nothing(node.target) or node.target in _READ_ONLY_FUNCTIONS


def _floating(value: Any) -> bool:
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return any(torch.is_tensor(leaf) and leaf.is_floating_point() for leaf in leaves)


def _expected(value: Any) -> Any:
    """What a node's tangent must look like: (shape, dtype) of a tensor, a tuple of those."""
    if torch.is_tensor(value):
        return (value.shape, value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_expected(v) if torch.is_tensor(v) else None for v in value)
    raise Decline("a varying value that is neither a tensor nor a tuple of tensors")


def _conforms(tangent: Any, expected: Any) -> bool:
    if tangent is None:
        return True
    if torch.is_tensor(tangent):
        return isinstance(expected, tuple) and len(expected) == 2 and (tangent.shape, tangent.dtype) == expected
    return isinstance(tangent, tuple) and len(tangent) == len(expected) and all(map(_conforms, tangent, expected))


@dataclass
class Linearization:
    """J at one point: `outputs`, the function's floating-point outputs there (flat, in order), and
    `push`, input tangents (None: held fixed) -> the tangents of those outputs."""

    outputs: list[torch.Tensor]
    inputs: list[tuple[fx.Node, int, tuple[torch.Size, torch.dtype]]]  # placeholder, input position, shape
    steps: list[tuple[fx.Node, Step, Any, list[fx.Node]]]  # node, its step, expected tangent, tangents freed
    results: list[tuple[fx.Node | None, tuple[int, ...], torch.Tensor]]  # output leaves: node, path, value

    def push(self, tangents: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        held: Tangents = {}
        for node, position, (shape, dtype) in self.inputs:
            tangent = tangents[position] if position < len(tangents) else None
            if tangent is None:
                tangent = torch.zeros(shape, dtype=dtype)
            if (tangent.shape, tangent.dtype) != (shape, dtype):
                raise ValueError(f"tangent of {node.name}: {tuple(tangent.shape)} {tangent.dtype}, not {tuple(shape)}")
            held[node] = tangent
        with torch.no_grad():
            for node, step, expected, freed in self.steps:
                tangent = step(held)
                if not _conforms(tangent, expected):
                    raise ValueError(f"{node.name}: a tangent unlike its value (a rule's error)")
                held[node] = tangent
                for source in freed:
                    held.pop(source, None)
            images = []
            for node, path, value in self.results:
                tangent = held.get(node) if node is not None else None
                for index in path:
                    tangent = None if tangent is None else tangent[index]
                images.append(torch.zeros_like(value) if tangent is None else tangent)
        return images


def linearize(gm: fx.GraphModule, inputs: Sequence[Any]) -> Linearization | None:
    """J of `gm` at `inputs` (every floating-point tensor input varies) as a `Linearization`, or
    None when some op has no tangent rule here (then autograd must do it).

    The forward runs in the caller's grad mode: given inputs that require grad under grad mode, the
    outputs carry autograd's graph of this very forward, so that J^T u (autograd) and J w (the
    steps) are of one computation and the caller need not run the model a second time. The steps
    hold detached values (ReLU's result, max-pool indices, BN scales), never autograd's graph."""
    try:
        return _linearize(gm, inputs)
    except Decline:
        return None


def _hooked(module: nn.Module) -> bool:
    """Hooks that run when `module` itself is called (its own, or every module's)."""
    from torch.nn.modules import module as registry

    own = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    every = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(getattr(module, name, None) for name in own) or any(getattr(registry, name, None) for name in every)


def _linearize(gm: fx.GraphModule, inputs: Sequence[Any]) -> Linearization:
    if _hooked(gm):  # calling gm would run them: its graph alone is not what it computes
        raise Decline("hooks on the module")
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for index, node in enumerate(nodes):
        for source in node.all_input_nodes:
            last_use[source] = index
    leaves: list[tuple[Any, int | None]] = []  # each flat input and, for a floating tensor argument, its position
    for index, argument in enumerate(inputs):
        flat = torch.utils._pytree.tree_flatten(argument)[0]
        varies = torch.is_tensor(argument) and argument.is_floating_point()
        leaves.extend((leaf, index if varies else None) for leaf in flat)
    leaves.reverse()
    forward = _Forward(gm, nodes)
    bound: list[tuple[fx.Node, int, tuple[torch.Size, torch.dtype]]] = []
    results: list[tuple[fx.Node | None, tuple[int, ...], torch.Tensor]] = []
    outputs: list[torch.Tensor] = []
    values = forward.values
    for index, node in enumerate(nodes):
        if node.op == "placeholder":
            if leaves:
                leaf, argument = leaves.pop()
            elif node.args:  # a default, as the module's own forward would use
                leaf, argument = node.args[0], None
            else:
                raise Decline(f"no input for {node.name}")
            values[node] = leaf
            forward.shared.add(node)
            if argument is not None:
                forward.varying.add(node)
                bound.append((node, argument, (leaf.shape, leaf.dtype)))
        elif node.op == "get_attr":
            values[node] = forward.interpreter.run_node(node)
            forward.shared.add(node)
        elif node.op == "output":
            _results(node, values, forward.varying, results, outputs)
        elif not any(source in forward.varying for source in node.all_input_nodes):
            values[node] = forward.interpreter.run_node(node)  # a constant: no tangent
        else:
            values[node] = forward.step(node)
        for source in node.all_input_nodes:
            if last_use.get(source) == index:
                values.pop(source, None)
    if leaves:
        raise Decline("more inputs than the graph has placeholders")
    steps = [(node, step, expected, []) for node, (step, expected) in forward.steps.items()]
    _schedule_frees(steps, results)
    return Linearization(outputs, bound, steps, results)


class _Forward:
    """The forward pass's state: values, which nodes vary, which may share storage, the steps."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
        self.gm = gm
        self.position = {node: index for index, node in enumerate(nodes)}
        self.interpreter = fx.Interpreter(gm)
        self.values: dict[fx.Node, Any] = {}
        self.interpreter.env = self.values
        self.varying: set[fx.Node] = set()
        self.shared: set[fx.Node] = set()  # values that may be storage of another node (views, inputs, attributes)
        self.steps: dict[fx.Node, tuple[Step, Any]] = {}  # node -> (its step, what its tangent must look like)

    def step(self, node: fx.Node) -> Any:
        """Run one call node whose input varies and record its tangent step; returns its value."""
        row, writes, twin = _row(self.gm, node)
        if row is None:
            if _read_only(self.gm, node):
                value = self.interpreter.run_node(node)
                if not _floating(value):
                    return value  # sizes, shapes, assertions: nothing to differentiate
            raise Decline(f"no tangent rule for {node.format_node()}")
        if writes:
            self.check_write(node)
        site = _Site(self.gm, node, self.values, self.varying, self.interpreter, twin)
        value, step = row.rule(site)
        self.varying.add(node)
        if not row.fresh:
            self.shared.add(node)
        self.steps[node] = (step, _expected(value))
        return value

    def check_write(self, node: fx.Node) -> None:
        """An op that writes into its first argument is computed as its out-of-place twin only when
        nothing can see the write: the written value is new storage of its own, and every other
        reader of it ran before and made no view of it, and no step holds it (ReLU's)."""
        written = node.args[0] if node.args else None
        if not isinstance(written, fx.Node) or written not in self.varying or written in self.shared:
            raise Decline(f"{node.name} writes into a value that other nodes may share")
        for user in written.users:
            if user is not node and (self.position[user] > self.position[node] or user in self.shared):
                raise Decline(f"{node.name} writes into a value that {user.name} reads")
        if isinstance(self.steps[written][0], _Mask):
            raise Decline(f"{node.name} writes into the result of {written.name}, which its tangent reads")


def _results(
    node: fx.Node,
    values: dict[fx.Node, Any],
    varying: set[fx.Node],
    results: list[tuple[fx.Node | None, tuple[int, ...], torch.Tensor]],
    outputs: list[torch.Tensor],
) -> None:
    """The output's floating-point tensors in the order the function returns them flattened."""
    structure = node.args[0] if node.args else None
    for leaf in torch.utils._pytree.tree_flatten(structure)[0]:
        if not isinstance(leaf, fx.Node):
            if torch.is_tensor(leaf):
                raise Decline("a tensor constant in the output")
            continue
        value = values[leaf]
        if leaf in varying:
            paths = _paths(value)
        else:
            paths = [((), t) for t in torch.utils._pytree.tree_flatten(value)[0] if torch.is_tensor(t)]
        for path, tensor in paths:
            if tensor.is_floating_point():
                results.append((leaf if leaf in varying else None, path, tensor.detach()))
                outputs.append(tensor)


def _paths(value: Any, prefix: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    if torch.is_tensor(value):
        return [(prefix, value)]
    if isinstance(value, (tuple, list)):
        return [found for i, v in enumerate(value) for found in _paths(v, (*prefix, i))]
    if value is None or isinstance(value, (int, float, bool)):
        return []
    raise Decline("a varying output that is neither a tensor nor a tuple of tensors")


def _schedule_frees(
    steps: list[tuple[fx.Node, Step, Any, list[fx.Node]]],
    results: list[tuple[fx.Node | None, tuple[int, ...], torch.Tensor]],
) -> None:
    """After each step, the tangents no later step reads (the outputs' are kept)."""
    kept = {node for node, _, _ in results}
    last: dict[fx.Node, int] = {}
    for index, (node, _, _, _) in enumerate(steps):
        for source in node.all_input_nodes:
            last[source] = index
    for source, index in last.items():
        if source not in kept:
            steps[index][3].append(source)
