"""Turn a torch.fx graph (symbolic trace or torch.export) into the internal `Graph` nodes."""

from __future__ import annotations

import builtins
import numbers
import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from ..ir import Node
from ..ops import overlap_factor
from .fx_tables import (
    ATEN_PAD_MODES,
    ATEN_TABLE,
    BATCH_NORM_ARGS,
    FUNCTION_TABLE,
    METHOD_TABLE,
    MODULE_TABLE,
    NO_RESULT,
    PAD_MODES,
    PASS_THROUGH,
    POSITIONAL_ARGS,
    PRIMARY_OUTPUT,
    QUALNAME_TABLE,
    SHAPE_OF_OTHER,
)

_PARAM_ROLES = {
    "linear": ("weight", "bias"),
    "conv": ("weight", "bias"),
    "conv_transpose": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var"),
    "batch_norm_train": ("weight", "bias", "running_mean", "running_var"),
    "prelu": ("weight",),
    "layer_norm": ("weight", "bias"),
    "group_norm": ("weight", "bias"),
    "rms_norm": ("weight",),
    "embedding": ("weight",),
}
_ATTR_NAMES = (
    "stride",
    "padding",
    "dilation",
    "groups",
    "output_padding",
    "kernel_size",
    "ceil_mode",
    "count_include_pad",
    "negative_slope",
    "eps",
    "training",
    "train",
    "p",
    "alpha",
    "scale_factor",
    "mode",
    "transposed",
    "ord",
    "pad",
    "value",
)
_MODULE_ATTRS = {
    "stride": "stride",
    "padding": "padding",
    "dilation": "dilation",
    "groups": "groups",
    "output_padding": "output_padding",
    "kernel_size": "kernel_size",
    "ceil_mode": "ceil_mode",
    "count_include_pad": "count_include_pad",
    "negative_slope": "negative_slope",
    "eps": "eps",
    "alpha": "alpha",
    "scale_factor": "scale_factor",
    "mode": "mode",
    "value": "value",
    "padding_mode": "padding_mode",
}


def canonical_module_op(module: nn.Module) -> str | None:
    for module_type, op in MODULE_TABLE:
        if isinstance(module, module_type):
            return op
    return None


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    return f"{module}.{name}" if module else name


def _aten_packet(target: Any) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::", 1)[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::", 1)[-1]
    return None


def _flatten_args(values: Iterable[Any]) -> list[Any]:
    flat: list[Any] = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat.extend(_flatten_args(value))
        elif isinstance(value, dict):
            flat.extend(_flatten_args(value.values()))
        else:
            flat.append(value)
    return flat


class FxConverter:
    """Converts one fx graph; shared by the symbolic-trace and torch.export front-ends."""

    def __init__(
        self,
        root: nn.Module | None,
        param_of: dict[str, str],
        tensor_nodes: set[str] | None,
        leaf_reasons: dict[str, str] | None = None,
        fixed: Mapping[str, torch.Tensor] | None = None,
        shapes: Mapping[str, list[int]] | None = None,
    ) -> None:
        self.root = root
        self.param_of = dict(param_of)  # fx node name -> state_dict key
        self.tensor_nodes = tensor_nodes  # fx nodes known to carry tensors (None: infer)
        self.leaf_reasons = leaf_reasons or {}
        self.fixed = fixed or {}  # buffers and constants (not trainable) by key, e.g. a blur filter
        self.shapes = shapes or {}  # fx node name -> traced output shape, when known
        self.nodes: dict[str, Node] = {}
        self.activations: set[str] = set()
        # fx node -> the node whose activation it is (read-through ops, an op's main output); a
        # runner computes such an fx node as part of that node (`absorbed`)
        self.alias: dict[str, str] = {}
        # fx node -> state_dict key of the 2-d parameter it is the transpose of (core ATen's linear)
        self.transposed_param: dict[str, str] = {}

    # -- helpers ---------------------------------------------------------------------
    def _activation(self, value: Any) -> str | None:
        """The graph node carrying `value`'s activation, or None when it carries none."""
        if not isinstance(value, fx.Node):
            return None
        name = self.alias.get(value.name, value.name)
        return name if name in self.activations else None

    def _is_activation(self, value: Any) -> bool:
        return self._activation(value) is not None

    @property
    def absorbed(self) -> dict[str, str]:
        """fx nodes that are no graph node of their own -> the graph node they are part of."""
        return dict(self.alias)

    def _param_key(self, value: Any) -> str | None:
        if isinstance(value, fx.Node):
            return self.param_of.get(value.name)
        return None

    def _named_args(self, op: str, fx_node: fx.Node) -> dict[str, Any]:
        args, kwargs = list(fx_node.args), dict(fx_node.kwargs)
        if fx_node.op == "call_function":
            try:
                normalized = torch.fx.operator_schemas.normalize_function(
                    fx_node.target, tuple(args), kwargs, normalize_to_only_use_kwargs=True
                )
            except Exception:
                normalized = None
            if normalized is not None:
                named = dict(normalized.kwargs)
                if "self" in named and "input" not in named:
                    named["input"] = named.pop("self")
                return named
        names = POSITIONAL_ARGS.get(op)
        if op in ("batch_norm", "batch_norm_train"):
            packet = _aten_packet(fx_node.target)
            if packet is None:
                names = BATCH_NORM_ARGS["functional"]
            elif packet == "_native_batch_norm_legit_no_training":
                names = BATCH_NORM_ARGS["aten_no_training"]
            else:
                names = BATCH_NORM_ARGS["aten"]
        named = dict(zip(names, args)) if names else {f"arg{i}": a for i, a in enumerate(args)}
        named.update(kwargs)
        return named

    # -- per fx op kind ------------------------------------------------------------------
    def _classify(self, fx_node: fx.Node) -> tuple[str, str, str]:
        """(canonical op, source name, scope) for a call node."""
        if fx_node.op == "call_module":
            module = self.root.get_submodule(fx_node.target) if self.root is not None else None
            if fx_node.target in self.leaf_reasons:
                return "opaque_module", type(module).__name__, fx_node.target
            op = canonical_module_op(module) if module is not None else None
            source = f"{type(module).__module__}.{type(module).__name__}"
            return op or source, source, fx_node.target
        scope = _scope_from_meta(fx_node)
        if fx_node.op == "call_method":
            op = METHOD_TABLE.get(fx_node.target)
            return op or f"Tensor.{fx_node.target}", f"Tensor.{fx_node.target}", scope
        target = fx_node.target
        source = _target_name(target)
        packet = _aten_packet(target)
        if packet is not None:
            op = ATEN_TABLE.get(packet)
            return op or source, source, scope
        if target is builtins.getattr:
            return ("shape" if fx_node.args[1] in ("shape", "dtype", "device", "ndim") else "@getattr"), source, scope
        try:
            op = FUNCTION_TABLE.get(target)
        except TypeError:  # unhashable target
            op = None
        return op or QUALNAME_TABLE.get(source) or source, source, scope

    def _module_params_attrs(self, op: str, fx_node: fx.Node) -> tuple[dict[str, str], dict[str, Any]]:
        module = self.root.get_submodule(fx_node.target)
        params: dict[str, str] = {}
        for role in _PARAM_ROLES.get(op, ()):
            if getattr(module, role, None) is not None and isinstance(getattr(module, role), torch.Tensor):
                params[role] = f"{fx_node.target}.{role}"
        attrs = {attr: getattr(module, name) for attr, name in _MODULE_ATTRS.items() if hasattr(module, name)}
        if op == "batch_norm":
            attrs["training"] = bool(module.training or module.running_mean is None)
            attrs["affine"] = module.weight is not None
        if isinstance(module, nn.Flatten):
            attrs = {}
        if op == "pad":
            attrs["mode"] = next((mode for kind, mode in PAD_MODES if isinstance(module, kind)), "constant")
        if op in ("dropout",):
            attrs = {"p": getattr(module, "p", 0.0)}
        return params, attrs

    def _function_params_attrs(self, op: str, fx_node: fx.Node) -> tuple[str, dict[str, str], dict[str, Any]]:
        named = self._named_args(op, fx_node)
        params: dict[str, str] = {}
        for role in _PARAM_ROLES.get(op, ()):
            key = self._param_key(named.get(role))
            if key is not None:
                params[role] = key
        attrs = {name: named[name] for name in _ATTR_NAMES if name in named and not isinstance(named[name], fx.Node)}
        if op == "@convolution":
            op = "conv_transpose" if attrs.get("transposed") else "conv"
            for role in ("weight", "bias"):
                key = self._param_key(named.get(role))
                if key is not None:
                    params[role] = key
        if op in ("conv", "conv_transpose", "linear") and params.get("weight") in self.fixed and "bias" not in params:
            # A weight that is a buffer, not a parameter (TResNet's blur filter): a fixed linear map
            # of degree 1, like a pooling, with its operator norm bounded here from its values.
            attrs["lipschitz"] = fixed_operator_bound(op, self.fixed[params["weight"]], attrs)
            op, params = "fixed_filter", {}
        if op == "pad" and _aten_packet(fx_node.target) in ATEN_PAD_MODES:
            attrs["mode"] = ATEN_PAD_MODES[_aten_packet(fx_node.target)]
        if op == "max_pool" or op == "avg_pool":
            if not attrs.get("stride"):
                attrs["stride"] = attrs.get("kernel_size")
        if op in ("batch_norm",) and _aten_packet(fx_node.target) == "_native_batch_norm_legit_no_training":
            attrs["training"] = False
        if op == "batch_norm" and "running_mean" not in params:
            attrs["training"] = True
        if op == "batch_norm":
            attrs["affine"] = "weight" in params
        return op, params, attrs

    def _resolve_arith(self, kind: str, fx_node: fx.Node) -> tuple[str, dict[str, str], dict[str, Any]]:
        operands = [a for a in fx_node.args[:2]] + [v for k, v in fx_node.kwargs.items() if k in ("other", "input")]
        acts = [a for a in operands if self._is_activation(a)]
        params = [self._param_key(a) for a in operands if self._param_key(a) is not None]
        numbers_ = [a for a in operands if isinstance(a, numbers.Number) and not isinstance(a, bool)]
        if kind in ("add", "sub"):
            if len(acts) >= 2:
                return kind, {}, {}
            if len(acts) == 1 and not params and numbers_ and all(float(n) == 0.0 for n in numbers_):
                return "identity", {}, {}
            return "add_const", ({"offset": params[0]} if params else {}), {}
        if kind == "mul":
            if len(acts) >= 2:
                return "mul", {}, {}
            if params:
                return "scale_param", {"scale": params[0]}, {}
            factor = float(numbers_[0]) if numbers_ else None
            return "scale", {}, {"factor": factor}
        if kind == "div":
            divisor = fx_node.args[1] if len(fx_node.args) > 1 else fx_node.kwargs.get("other")
            if self._is_activation(divisor) or not self._is_activation(fx_node.args[0]):
                return "div", {}, {}
            if self._param_key(divisor) is not None:
                return "scale_param", {"inverse_scale": self._param_key(divisor)}, {}
            value = divisor if isinstance(divisor, numbers.Number) else None
            return "scale", {}, {"factor": (1.0 / float(value)) if value else None}
        raise AssertionError(kind)

    # -- main ------------------------------------------------------------------------
    def convert(self, graph: fx.Graph) -> dict[str, Node]:
        for fx_node in graph.nodes:
            self._convert_node(fx_node)
        return self.nodes

    def _add(self, node: Node, activation: bool = True) -> None:
        self.nodes[node.name] = node
        if activation:
            self.activations.add(node.name)

    def _convert_node(self, fx_node: fx.Node) -> None:
        name = fx_node.name
        if fx_node.op == "placeholder":
            if name in self.param_of:
                return
            is_tensor = self.tensor_nodes is None or name in self.tensor_nodes
            attrs = {"out_shape": list(self.shapes[name])} if name in self.shapes else {}
            node = Node(name, "input" if is_tensor else "constant", attrs=attrs, source="input")
            self._add(node, activation=is_tensor)
            return
        if fx_node.op == "get_attr":
            value = _resolve_attr(self.root, fx_node.target) if self.root is not None else None
            if isinstance(value, torch.Tensor):
                self.param_of[name] = fx_node.target
            return
        if fx_node.op == "output":
            inputs = [a for a in map(self._activation, _flatten_args(fx_node.args)) if a is not None]
            self._add(Node(name, "output", inputs=inputs, source="output"), activation=False)
            return
        if self._read_through(fx_node):
            return
        self._note_transposed_param(fx_node)

        op, source, scope = self._classify(fx_node)
        params: dict[str, str] = {}
        attrs: dict[str, Any] = {}
        fx_inputs = _flatten_args(list(fx_node.args) + list(fx_node.kwargs.values()))
        if _method_or_packet(fx_node) in SHAPE_OF_OTHER:
            fx_inputs = fx_inputs[:1]
        if fx_node.op == "call_module" and op != "opaque_module" and self.root is not None:
            params, attrs = self._module_params_attrs(op, fx_node)
        elif op.startswith("@") and op[1:] in ("add", "sub", "mul", "div"):
            op, params, attrs = self._resolve_arith(op[1:], fx_node)
        elif op in ("@addmm", "@mm"):
            op, params, fx_inputs = self._resolve_matrix_product(op[1:], fx_node)
        elif op == "@addcmul":
            op, params, attrs = self._resolve_addcmul(fx_node)
        elif op == "@getitem" or op == "@getattr":
            op = "slice" if self._is_activation(fx_node.args[0]) else "shape"
            if op == "slice" and _aten_packet(getattr(fx_node.args[0], "target", None)) in PRIMARY_OUTPUT:
                op = "side_output"  # a used statistics / indices output (the main one is aliased)
        elif fx_node.op == "call_function":
            op, params, attrs = self._function_params_attrs(op, fx_node)
        if op == "batch_norm" and attrs.get("training"):
            op = "batch_norm_train"
        if op == "dropout" and attrs.get("train") and float(attrs.get("p") or 0.0) > 0.0:
            op = "dropout_train"
        if op == "pad" and (attrs.get("mode") or "constant") == "constant" and float(attrs.get("value") or 0.0) != 0.0:
            op = "add_const"  # padding with a non-zero constant adds an offset at the border
        inputs = [a for a in map(self._activation, fx_inputs) if a is not None]
        if op not in ("add", "sub", "mul", "matmul", "cat"):
            inputs = list(dict.fromkeys(inputs))
        if op == "shape" or not inputs:
            # Shape arithmetic, or a tensor made from nothing that flows (a constant).
            is_tensor = self.tensor_nodes is not None and name in self.tensor_nodes
            self._add(Node(name, "constant" if is_tensor else "shape", source=source, scope=scope), activation=False)
            return
        if op in ("max_pool", "avg_pool"):
            attrs = _expand_pool_attrs(attrs, source)
        is_tensor = self.tensor_nodes is None or name in self.tensor_nodes
        if name in self.shapes:
            attrs["out_shape"] = list(self.shapes[name])
        node = Node(name, op, inputs=inputs, params=params, attrs=_plain(attrs), source=source, scope=scope)
        self._add(node, activation=is_tensor)

    def _read_through(self, fx_node: fx.Node) -> bool:
        """Nodes that are no operation of their own: an op's main output taken from its tuple
        (torch 2.4's BatchNorm, core ATen's max pooling), value-preserving copies, unused
        statistics outputs, run-time checks. True when `fx_node` is handled (aliased or dropped)."""
        if fx_node.op != "call_function":
            return False
        packet = _aten_packet(fx_node.target)
        if packet in NO_RESULT:
            return True
        if packet in PASS_THROUGH:
            source = self._activation(fx_node.args[0]) if fx_node.args else None
            if source is not None:
                self.alias[fx_node.name] = source
                return True
            return False
        if fx_node.target is not operator.getitem or not isinstance(fx_node.args[0], fx.Node):
            return False
        producer, index = fx_node.args[0], fx_node.args[1]
        primary = PRIMARY_OUTPUT.get(_aten_packet(producer.target) or "")
        if primary is None or self._activation(producer) is None:
            return False
        if index == primary:
            self.alias[fx_node.name] = self._activation(producer)
            return True
        return not fx_node.users  # an unused statistics / indices output; a used one stays a node

    def _note_transposed_param(self, fx_node: fx.Node) -> None:
        """Core ATen writes Linear as addmm(bias, x, permute(weight)): remember the transposes."""
        packet = _aten_packet(fx_node.target) if fx_node.op == "call_function" else None
        if packet not in ("t", "permute", "transpose", "numpy_T") or not fx_node.args:
            return
        key = self._param_key(fx_node.args[0])
        if key is None or _rank(fx_node.args[0], self.root, key) != 2:
            return
        if packet == "permute" and [int(d) % 2 for d in fx_node.args[1]] != [1, 0]:
            return
        if packet == "transpose" and int(fx_node.args[1]) % 2 == int(fx_node.args[2]) % 2:
            return
        self.transposed_param[fx_node.name] = key

    def _resolve_matrix_product(self, kind: str, fx_node: fx.Node) -> tuple[str, dict[str, str], list[Any]]:
        """addmm(bias, x, W^T) and mm(x, W^T) with W a parameter are a Linear layer; any other
        matrix product is a product of activations."""
        named = dict(zip(("input", "mat1", "mat2") if kind == "addmm" else ("mat1", "mat2"), fx_node.args))
        named.update(fx_node.kwargs)
        weight = self.transposed_param.get(getattr(named.get("mat2"), "name", ""))
        bias = self._param_key(named.get("input")) if kind == "addmm" else None
        unit = all(float(named.get(k, 1)) == 1.0 for k in ("beta", "alpha"))
        if weight is None or not self._is_activation(named.get("mat1")) or not unit:
            return "matmul", {}, [named.get("input"), named.get("mat1"), named.get("mat2")]
        if kind == "addmm" and bias is None:
            return "matmul", {}, [named.get("input"), named.get("mat1"), named.get("mat2")]
        params = {"weight": weight, **({"bias": bias} if bias else {})}
        return "linear", params, [named["mat1"]]

    def _resolve_addcmul(self, fx_node: fx.Node) -> tuple[str, dict[str, str], dict[str, Any]]:
        """addcmul(input, t1, t2, value) = input + value * t1 * t2: a product of activations when
        two operands are activations, else an elementwise scale plus an offset."""
        named = ("tensor1", "tensor2")
        operands = list(fx_node.args[:3]) + [fx_node.kwargs[k] for k in named if k in fx_node.kwargs]
        if sum(self._is_activation(a) for a in operands) >= 2:
            return "mul", {}, {}
        if self._is_activation(operands[0]):
            return "add_const", {}, {}
        return "addcmul", {}, {}


def fixed_operator_bound(op: str, weight: torch.Tensor, attrs: dict[str, Any]) -> float:
    """An upper bound on the l2 operator norm of a linear map with a fixed weight: the spectral
    norm for a matrix; for a (transposed, grouped) convolution the largest group's Frobenius norm
    times the overlap factor (a grouped convolution is block diagonal over its groups)."""
    weight = weight.detach().double()
    if op == "linear":
        return float(torch.linalg.matrix_norm(weight, ord=2))
    groups = int(attrs.get("groups") or 1)
    per_group = max(float(block.norm()) for block in weight.chunk(groups, dim=0))
    return per_group * overlap_factor(list(weight.shape[2:]), attrs.get("stride") or 1, attrs.get("dilation") or 1)


def _method_or_packet(fx_node: fx.Node) -> str | None:
    if fx_node.op == "call_method":
        return str(fx_node.target)
    return _aten_packet(fx_node.target) if fx_node.op == "call_function" else None


def _rank(value: fx.Node, root: nn.Module | None, key: str) -> int | None:
    """Number of dimensions of a parameter node, from its traced value or the module."""
    traced = value.meta.get("val")
    if isinstance(traced, torch.Tensor):
        return traced.dim()
    tensor = _resolve_attr(root, key) if root is not None else None
    return tensor.dim() if isinstance(tensor, torch.Tensor) else None


def _expand_pool_attrs(attrs: dict[str, Any], source: str) -> dict[str, Any]:
    """Pool sizes as per-dimension lists: MaxPool2d(2) -> kernel_size [2, 2]."""
    match = re.search(r"(\d)d", source)
    dims = int(match.group(1)) if match else None
    out = dict(attrs)
    for key in ("kernel_size", "stride", "padding", "dilation"):
        value = out.get(key)
        if isinstance(value, int) and dims:
            out[key] = [value] * dims
        elif isinstance(value, (list, tuple)) and len(value) == 1 and dims:
            out[key] = list(value) * dims
    if not out.get("stride"):
        out["stride"] = out.get("kernel_size")
    return out


def _plain(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attribute values as plain Python (tuples -> lists), for stable reports."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, torch.dtype):
            value = str(value)
        out[key] = value
    return out


def _resolve_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _scope_from_meta(fx_node: fx.Node) -> str:
    stack = fx_node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_module_path(path)


def _clean_module_path(path: str) -> str:
    """'L['self'].layer1[0].conv1' (dynamo style) -> 'layer1.0.conv1'."""
    if path.startswith("L['self']"):
        path = path[len("L['self']") :].lstrip(".")
        path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.strip(".")
