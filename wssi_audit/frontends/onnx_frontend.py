"""ONNX front-end: an `onnx.ModelProto` -> the internal `Graph` (same canonical ops as FX).

Weights are named by their initializer names. Before conversion the model is normalized
(function-preserving, on a copy): `Constant` nodes and `Identity` nodes that only alias an
initializer become initializers of their own, and a bias-like initializer shared by several
nodes (exporters deduplicate equal tensors, e.g. zero biases) gets one copy per extra use, so
that shifting one layer's bias never moves another's.

Weight layouts follow torch: a linear weight is (out, in). A `Gemm` with transB=0 or a
`MatMul` by an initializer holds (in, out); `graph.tensors` then holds a transposed copy under
the initializer's name (also multiplied by Gemm's alpha; a Gemm bias by beta), and
`OnnxModel.encode` undoes this when tensors are written back (runner, balance).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, TraceError, describe, shorten
from ..ir import Graph, Node, Runner
from ..safe_archive import check_run_fits

# ONNX op_type -> canonical op (wssi_audit.ops). Ops resolved by `_convert_node` because their
# meaning depends on the operands: Gemm, MatMul, Add, Sub, Mul, Div, Gather, BatchNormalization.
ONNX_TABLE: dict[str, str] = {
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "MaxPool": "max_pool",
    "AveragePool": "avg_pool",
    "GlobalAveragePool": "global_avg_pool",
    "GlobalMaxPool": "adaptive_max_pool",
    "Flatten": "flatten",
    "Reshape": "reshape",
    "Transpose": "permute",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Concat": "cat",
    "Split": "split",
    "Slice": "slice",
    "Identity": "identity",
    "Dropout": "dropout",
    "Cast": "identity",
    "Pad": "pad",
    "Resize": "upsample",
    "Upsample": "upsample",
    "Expand": "expand",
    "Neg": "neg",
    "ReduceMean": "mean",
    "ReduceSum": "sum",
    "ReduceMax": "max_reduce",
    "Shape": "shape",
    "Size": "shape",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softmax": "softmax",
    "LogSoftmax": "log_softmax",
    "Gelu": "gelu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "Softplus": "softplus",
    "Mish": "mish",
    "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish",
    "Clip": "clamp",
    "Erf": "pointwise",
    "Exp": "pointwise",
    "Log": "pointwise",
    "Sqrt": "pointwise",
    "Reciprocal": "pointwise",
    "Pow": "pointwise",
    "Abs": "pointwise",
    "LayerNormalization": "layer_norm",
    "GroupNormalization": "group_norm",
    "InstanceNormalization": "instance_norm",
    "RMSNormalization": "rms_norm",
    "Einsum": "matmul",
    "Attention": "attention",
}
# ONNX attribute name -> FX attribute name (Node.attrs), values as lists like the FX converter.
_ATTRS = {
    "strides": "stride",
    "dilations": "dilation",
    "group": "groups",
    "kernel_shape": "kernel_size",
    "ceil_mode": "ceil_mode",
    "count_include_pad": "count_include_pad",
    "output_padding": "output_padding",
    "epsilon": "eps",
    "alpha": "alpha",
    "mode": "mode",
}
# Inputs that carry parameters, by position, per canonical op.
_PARAM_INPUTS = {
    "conv": {1: "weight", 2: "bias"},
    "conv_transpose": {1: "weight", 2: "bias"},
    "prelu": {1: "weight"},
    "batch_norm": {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    "layer_norm": {1: "weight", 2: "bias"},
    "group_norm": {1: "weight", 2: "bias"},
    "instance_norm": {1: "weight", 2: "bias"},
}


def load_onnx(path: str | Path) -> Any:
    """Read and check an ONNX file; any problem is an `InputError` with one line. External data is
    read only from regular files inside the model's folder (no absolute paths, no '..', no symlink
    out), whatever the installed onnx version checks itself."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise InputError(f"cannot read ONNX file {path.name}: {describe(error)}") from None
    if not model.graph.node:
        raise InputError(f"cannot read ONNX file {path.name}: it holds no graph (empty or not an ONNX model)")
    _load_external_data(model, path)
    missing = _unproduced_inputs(model.graph, set())
    if missing:
        node, name = missing[0]
        label = f"{node.name} ({node.op_type})" if node.name else node.op_type
        raise InputError(
            shorten(
                f"invalid ONNX model {path.name}: node {label} reads '{name}', which is no initializer, "
                f"graph input or node output (a missing initializer?)"
            )
        )
    try:
        # Protos over 2 GB (external data) can only be checked from the file.
        onnx.checker.check_model(str(path) if path.stat().st_size > 2**31 - 1 else model)
    except Exception as error:
        raise InputError(f"invalid ONNX model {path.name}: {describe(error)}") from None
    return model


def _external_tensors(model: Any) -> list[Any]:
    """Every tensor of the model stored outside the .onnx file (initializers, constants, subgraphs)."""
    from onnx import external_data_helper

    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def _load_external_data(model: Any, path: Path) -> None:
    from onnx import external_data_helper

    tensors = _external_tensors(model)
    if not tensors:
        return
    folder = path.parent.resolve()
    for tensor in tensors:
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location or ""
        where = f"ONNX file {path.name}: tensor {tensor.name} stores its data in '{location}'"
        parts = location.replace("\\", "/").split("/")
        if not location or Path(location).is_absolute() or location.startswith(("/", "\\")) or ".." in parts:
            raise InputError(shorten(f"{where}, outside the model's folder"))
        target = folder / location
        try:
            real = target.resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            raise InputError(shorten(f"{where}, which is missing")) from None
        if folder not in real.parents:
            raise InputError(shorten(f"{where}, a link out of the model's folder"))
        if not real.is_file():
            raise InputError(shorten(f"{where}, which is not a regular file"))
        end = (info.offset or 0) + (info.length or 0)
        if end > real.stat().st_size:
            raise InputError(shorten(f"{where}, which is shorter ({real.stat().st_size} bytes) than it says ({end})"))
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as error:
        raise InputError(f"cannot read external data of ONNX file {path.name}: {describe(error)}") from None


def _unproduced_inputs(graph: Any, outer: set[str]) -> list[tuple[Any, str]]:
    """(node, name) for node inputs nothing defines: no initializer, graph input, node output or
    name of an enclosing graph."""
    known = outer | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
    known |= {name for node in graph.node for name in node.output}
    missing = [(node, name) for node in graph.node for name in node.input if name and name not in known]
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                missing += _unproduced_inputs(subgraph, known)
    return missing


@dataclass
class Encoding:
    """How a tensor in `graph.tensors` maps back to its initializer: raw = (value / scale)[.T]."""

    transpose: bool = False
    scale: float = 1.0


@dataclass
class OnnxModel:
    """The normalized model plus what is needed to write tensors back into it."""

    proto: Any  # onnx.ModelProto (normalized copy)
    encodings: dict[str, Encoding] = field(default_factory=dict)

    def encode(self, key: str, value: torch.Tensor, dtype: np.dtype) -> np.ndarray:
        enc = self.encodings.get(key, Encoding())
        array = value.detach().double() / enc.scale
        if enc.transpose:
            array = array.T
        return array.cpu().numpy().astype(dtype)

    def with_tensors(self, overrides: Mapping[str, torch.Tensor]) -> Any:
        """A copy of the model with some initializers replaced (keys as in `graph.tensors`)."""
        from onnx import numpy_helper

        if not overrides:
            return self.proto
        proto = copy.deepcopy(self.proto)
        found = set()
        for init in proto.graph.initializer:
            if init.name in overrides:
                dtype = numpy_helper.to_array(init).dtype
                init.CopyFrom(numpy_helper.from_array(self.encode(init.name, overrides[init.name], dtype), init.name))
                found.add(init.name)
        missing = set(overrides) - found
        if missing:
            raise KeyError(f"not initializers of this ONNX model: {', '.join(sorted(missing))}")
        return proto


def _attrs_of(node: Any) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, float):
            value = float(str(np.float32(value)))  # ONNX stores float32: 0.2, not 0.20000000298
        out[attr.name] = value
    return out


def _constant_tensor(node: Any) -> Any:
    """The TensorProto of a `Constant` node (value, value_float(s), value_int(s)), else None."""
    from onnx import numpy_helper

    attrs = {attr.name: attr for attr in node.attribute}
    if "value" in attrs:
        return copy.deepcopy(attrs["value"].t)
    arrays = {
        "value_float": lambda a: np.array(a.f, np.float32),
        "value_floats": lambda a: np.array(list(a.floats), np.float32),
        "value_int": lambda a: np.array(a.i, np.int64),
        "value_ints": lambda a: np.array(list(a.ints), np.int64),
    }
    for key, make in arrays.items():
        if key in attrs:
            return numpy_helper.from_array(make(attrs[key]))
    return None


def normalize(proto: Any) -> Any:
    """Function-preserving copy: constants and initializer aliases become initializers,
    and bias-like initializers shared by several nodes are duplicated (see module doc)."""
    from onnx import numpy_helper

    model = copy.deepcopy(proto)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    keep = []
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and len(node.output) == 1 else None
        if tensor is not None:
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            inits[tensor.name] = tensor
            continue
        if node.op_type == "Identity" and node.input[0] in inits:
            tensor = copy.deepcopy(inits[node.input[0]])
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            inits[tensor.name] = tensor
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    # Untie shared non-weight parameters (position >= 2 of Conv/Gemm/BatchNormalization...).
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        positions = range(2, len(node.input)) if node.op_type in ("Conv", "ConvTranspose", "Gemm") else ()
        if node.op_type == "BatchNormalization":
            positions = range(1, len(node.input))
        for position in positions:
            name = node.input[position]
            if name not in inits:
                continue
            if name in seen:
                copy_name = f"{name}__{node.name or index}_{position}"
                array = numpy_helper.to_array(inits[name])
                tensor = numpy_helper.from_array(array.copy(), copy_name)
                graph.initializer.append(tensor)
                inits[copy_name] = tensor
                node.input[position] = copy_name
            seen.add(name)
    return model


def _scope(name: str) -> str:
    """'/layers/layers.0/downsample/downsample.0/Conv' (torch exporter naming, each segment
    relative to its parent's name) -> 'layers.0.downsample.0'."""
    if not name.startswith("/"):
        return ""
    path, last = "", ""
    for segment in name.strip("/").split("/")[:-1]:
        if last and segment.startswith(last + "."):
            path += segment[len(last) :]
        else:
            path = f"{path}.{segment}" if path else segment
        last = segment
    return path


def _lists(attrs: dict[str, Any], op: str) -> dict[str, Any]:
    """ONNX attributes in the FX converter's form (stride, padding as lists, groups, ...)."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in _ATTRS:
            out[_ATTRS[key]] = list(value) if isinstance(value, (list, tuple)) else value
    pads = attrs.get("pads")
    if pads is not None:
        pads = list(pads)
        half = len(pads) // 2
        out["padding"] = pads[:half] if pads[:half] == pads[half:] else pads
    if op == "leaky_relu":
        out = {"negative_slope": float(attrs.get("alpha", 0.01))}
    if op in ("max_pool", "avg_pool") and not out.get("stride"):
        out["stride"] = out.get("kernel_size")
    if op in ("max_pool", "avg_pool") and "padding" not in out and out.get("kernel_size"):
        out["padding"] = [0] * len(out["kernel_size"])
    if "ceil_mode" in out:
        out["ceil_mode"] = bool(out["ceil_mode"])
    return out


def _conv_defaults(weight: torch.Tensor) -> dict[str, Any]:
    """ONNX omits default attributes; the FX converter's nodes always carry them."""
    dims = weight.dim() - 2
    defaults: dict[str, Any] = {
        "stride": [1] * dims,
        "padding": [0] * dims,
        "dilation": [1] * dims,
        "groups": 1,
        "output_padding": [0] * dims,
        "kernel_size": list(weight.shape[2:]),
        "padding_mode": "zeros",  # ONNX pads a Conv with zeros; other modes are separate Pad nodes
    }
    return defaults


class _Converter:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.arrays = {init.name: numpy_helper.to_array(init) for init in self.graph.initializer}
        self.tensors: dict[str, torch.Tensor] = {}
        self.encodings: dict[str, Encoding] = {}
        self.nodes: dict[str, Node] = {}
        self.producer: dict[str, str] = {}  # ONNX value name -> internal node name
        self.activations: set[str] = set()  # ONNX value names carrying activations
        self.fused: set[int] = set()  # indices of Add nodes fused into a MatMul
        self.onnx_nodes: dict[str, list[int]] = {}  # internal node -> indices of the ONNX nodes it stands for
        self.values: dict[str, list[str]] = {}  # internal node -> the ONNX values it outputs
        self._index = -1
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.graph.node):
            for name in node.input:
                self.consumers.setdefault(name, []).append(index)

    def _tensor(self, key: str, encoding: Encoding | None = None) -> str:
        if key not in self.tensors:
            array = self.arrays[key]
            value = torch.from_numpy(np.array(array, copy=True))
            if encoding is not None:
                value = value.T.contiguous() if encoding.transpose else value
                value = value * encoding.scale if encoding.scale != 1.0 else value
                self.encodings[key] = encoding
            self.tensors[key] = value
        return key

    def _is_act(self, name: str) -> bool:
        return name in self.activations

    def _add(self, node: Node, outputs: Sequence[str], activation: bool = True) -> None:
        self.nodes[node.name] = node
        if self._index >= 0:
            fused = [i for i in self.fused if i > self._index and set(self.graph.node[i].output) & set(outputs)]
            self.onnx_nodes[node.name] = [self._index, *fused]
        named = [out for out in outputs if out]
        self.values[node.name] = named[-1:] if len(self.onnx_nodes.get(node.name, ())) > 1 else named
        for out in outputs:
            if out:
                self.producer[out] = node.name
                if activation:
                    self.activations.add(out)

    def _inputs(self, names: Sequence[str]) -> list[str]:
        return [self.producer[n] for n in names if n and self._is_act(n)]

    def _scalar(self, name: str) -> float | None:
        array = self.arrays.get(name)
        if array is None or array.size != 1:
            return None
        return float(array.reshape(()))

    def convert(self) -> dict[str, Node]:
        for value in self.graph.input:
            if value.name in self.arrays:
                continue
            self._add(Node(value.name, "input", source="input"), [value.name])
        for index, onnx_node in enumerate(self.graph.node):
            if index not in self.fused:
                self._index = index
                self._convert_node(index, onnx_node)
        outputs = [self.producer[v.name] for v in self.graph.output if v.name in self.producer and self._is_act(v.name)]
        self.nodes["output"] = Node("output", "output", inputs=outputs, source="output")
        return self.nodes

    def _node_name(self, index: int, onnx_node: Any) -> str:
        name = onnx_node.name or f"{onnx_node.op_type}_{index}"
        return name if name not in self.nodes else f"{name}_{index}"

    def _convert_node(self, index: int, onnx_node: Any) -> None:
        op_type = onnx_node.op_type
        name = self._node_name(index, onnx_node)
        attrs_raw = _attrs_of(onnx_node)
        acts = [n for n in onnx_node.input if n and self._is_act(n)]
        outputs = list(onnx_node.output)
        source = f"onnx.{op_type}"
        scope = _scope(onnx_node.name)
        if not acts:
            # Computed from constants only (shape arithmetic, folded constants): not an activation.
            self._add(Node(name, "shape", source=source, scope=scope), outputs, activation=False)
            return
        params: dict[str, str] = {}
        attrs: dict[str, Any] = {}
        op = ONNX_TABLE.get(op_type, op_type)
        activation = op != "shape"
        if op_type == "Gemm":
            op, params, attrs = self._gemm(onnx_node, attrs_raw)
        elif op_type == "MatMul":
            op, params, attrs = self._matmul(onnx_node, outputs)
        elif op_type in ("Add", "Sub", "Mul", "Div"):
            op, params, attrs = self._arith(op_type.lower(), onnx_node)
        elif op_type == "BatchNormalization":
            op = "batch_norm_train" if attrs_raw.get("training_mode", 0) else "batch_norm"
            attrs = {"eps": float(attrs_raw.get("epsilon", 1e-5)), "training": op == "batch_norm_train"}
            attrs["affine"] = True
            params = self._params(onnx_node, _PARAM_INPUTS["batch_norm"])
            outputs = outputs[:1]
        elif op_type == "Gather" and onnx_node.input[0] in self.arrays:
            op, params = "embedding", {"weight": self._tensor(onnx_node.input[0])}
        elif op_type == "Gather":
            op = "slice"
        elif op_type == "Dropout":
            op, outputs = "dropout", outputs[:1]
        elif op_type == "Pad" and attrs_raw.get("mode", "constant") != "constant":
            op = "pad_" + str(attrs_raw.get("mode"))  # reflect/edge padding: unclassified
        elif op_type == "Pad" and self._pad_value(onnx_node, attrs_raw) != 0.0:
            op = "add_const"  # padding with a non-zero constant adds an offset at the border
        else:
            attrs = _lists(attrs_raw, op)
            if op in _PARAM_INPUTS:
                params = self._params(onnx_node, _PARAM_INPUTS[op])
            if op in ("conv", "conv_transpose") and "weight" in params:
                attrs = {**_conv_defaults(self.tensors[params["weight"]]), **attrs}
        if op == "max_pool" and len(outputs) > 1:
            outputs = outputs[:1]
        # Shape reads never count as consumers (as in the FX converter): they must not split chains.
        inputs = self._inputs(onnx_node.input) if activation else []
        if op not in ("add", "sub", "mul", "matmul", "cat"):
            inputs = list(dict.fromkeys(inputs))
        node = Node(name, op, inputs=inputs, params=params, attrs=attrs, source=source, scope=scope)
        self._add(node, outputs, activation=activation)

    def _pad_value(self, onnx_node: Any, attrs: dict[str, Any]) -> float | None:
        """The constant a Pad fills with (opset < 11: attribute; later: optional 3rd input)."""
        if len(onnx_node.input) > 2 and onnx_node.input[2]:
            return self._scalar(onnx_node.input[2])  # None when computed at run time
        return float(attrs.get("value", 0.0))

    def _params(self, onnx_node: Any, positions: dict[int, str]) -> dict[str, str]:
        params = {}
        for position, role in positions.items():
            if position < len(onnx_node.input) and onnx_node.input[position] in self.arrays:
                params[role] = self._tensor(onnx_node.input[position])
        return params

    def _gemm(self, onnx_node: Any, attrs: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
        a, b = onnx_node.input[0], onnx_node.input[1]
        c = onnx_node.input[2] if len(onnx_node.input) > 2 else ""
        if attrs.get("transA", 0) or b not in self.arrays or not self._is_act(a):
            return "matmul", {}, {}
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        params = {"weight": self._tensor(b, Encoding(transpose=not attrs.get("transB", 0), scale=alpha))}
        if c and c in self.arrays:
            params["bias"] = self._tensor(c, Encoding(scale=beta))
        elif c:
            return "matmul", {}, {}  # bias computed at run time
        return "linear", params, {}

    def _matmul(self, onnx_node: Any, outputs: list[str]) -> tuple[str, dict[str, str], dict[str, Any]]:
        a, b = onnx_node.input[0], onnx_node.input[1]
        if b not in self.arrays or not self._is_act(a) or self.arrays[b].ndim != 2:
            return "matmul", {}, {}
        params = {"weight": self._tensor(b, Encoding(transpose=True))}
        readers = self.consumers.get(onnx_node.output[0], [])
        if len(readers) == 1 and onnx_node.output[0] not in {v.name for v in self.graph.output}:
            add = self.graph.node[readers[0]]
            others = [n for n in add.input if n != onnx_node.output[0]]
            if add.op_type == "Add" and len(others) == 1 and others[0] in self.arrays:
                bias = self.arrays[others[0]]
                if bias.ndim <= 1 or bias.size == bias.shape[-1]:
                    params["bias"] = self._tensor(others[0])
                    self.fused.add(readers[0])
                    outputs[:] = [*outputs, *add.output]
        return "linear", params, {}

    def _arith(self, kind: str, onnx_node: Any) -> tuple[str, dict[str, str], dict[str, Any]]:
        operands = list(onnx_node.input[:2])
        acts = [n for n in operands if self._is_act(n)]
        consts = [n for n in operands if n in self.arrays]
        if len(acts) == 2:
            return ("div" if kind == "div" else kind), {}, {}
        if len(acts) != 1 or len(consts) != 1:
            return f"onnx.{kind}", {}, {}  # an operand computed at run time from no activation
        const = consts[0]
        scalar = self._scalar(const)
        if kind in ("add", "sub"):
            if scalar == 0.0 or (const in self.arrays and not np.any(self.arrays[const])):
                return "identity", {}, {}
            if kind == "sub" and operands[0] == const:
                return "add_const", {}, {}  # c - x
            return "add_const", {"offset": self._tensor(const)}, {}
        if kind == "mul":
            if scalar is not None:
                return "scale", {}, {"factor": scalar}
            return "scale_param", {"scale": self._tensor(const)}, {}
        if operands[1] != const:  # c / x
            return "div", {}, {}
        if scalar is not None:
            return "scale", {}, {"factor": (1.0 / scalar) if scalar else None}
        return "scale_param", {"inverse_scale": self._tensor(const)}, {}


def default_inputs(model: Any, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the model's declared shapes; dynamic dimensions set to 1."""
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            inputs.append(torch.randn(shape, generator=generator).to(torch.from_numpy(np.zeros(0, dtype)).dtype))
        else:
            inputs.append(torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype))
    return tuple(inputs)


class OnnxRunner(Runner):
    """Runs the model in onnxruntime (float32: ORT has no float64 kernels for most ops, e.g. Conv).

    Intermediate values come back by adding them as graph outputs; a segment runs as a sub-model cut
    out with onnx.utils.Extractor, its boundary values fed as inputs.
    """

    dtype = torch.float32

    def __init__(self, onnx_model: OnnxModel, converter: _Converter, example_inputs: Sequence[Any]) -> None:
        from onnx import helper, shape_inference

        self.model = onnx_model
        proto = onnx_model.proto
        self._values = converter.values
        self._onnx_nodes = converter.onnx_nodes
        self._initializers = {init.name for init in proto.graph.initializer}
        self._input_names = [v.name for v in proto.graph.input if v.name not in self._initializers]
        self._output_names = [v.name for v in proto.graph.output]
        try:
            inferred = shape_inference.infer_shapes(proto)
            infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        except Exception:
            infos = [*proto.graph.input, *proto.graph.output]
        self._info = {v.name: v for v in infos}
        check_run_fits(
            _static_bytes(self._info.values(), example_inputs),
            "this ONNX model at its input",
            "audit it at a smaller --input-shape",
        )
        input_types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}
        self._feeds = {}
        for name, value in zip(self._input_names, example_inputs):
            array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
            self._feeds[name] = array.astype(helper.tensor_dtype_to_np_dtype(input_types[name]))
        self._options = None

    def _session(self, proto: Any) -> Any:
        import onnxruntime as ort

        if self._options is None:
            self._options = ort.SessionOptions()
            self._options.log_severity_level = 4  # fatal only: its errors are raised, and said in one line
        return ort.InferenceSession(proto.SerializeToString(), self._options, providers=["CPUExecutionProvider"])

    def _value_info(self, name: str) -> Any:
        from onnx import TensorProto, helper

        return self._info.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None)

    def _collect(self, names: list[str], arrays: list[Any], capture: Collection[str]) -> dict[str, Any]:
        by_value = {name: torch.from_numpy(np.asarray(a)) for name, a in zip(names, arrays)}
        out = {
            node: [_as_float64(by_value[v]) for v in self._values.get(node, []) if v in by_value] for node in capture
        }
        return {k: (v[0] if len(v) == 1 else v) for k, v in out.items()}

    def run(self, overrides: Mapping[str, torch.Tensor], capture: Collection[str] = ()) -> dict[str, Any]:
        proto = self.model.with_tensors(overrides)
        extra = [v for node in capture for v in self._values.get(node, []) if v not in self._output_names]
        extra = [v for v in dict.fromkeys(extra) if v not in self._input_names]
        if extra:
            proto = copy.deepcopy(proto) if proto is self.model.proto else proto
            proto.graph.output.extend(self._value_info(v) for v in extra)
        names = [*self._output_names, *extra]
        arrays = self._session(proto).run(names, self._feeds)
        values = self._collect(names, arrays, [c for c in capture])
        for node in capture:  # graph inputs are fed, not computed
            inputs = [v for v in self._values.get(node, []) if v in self._feeds]
            if inputs:
                values[node] = _as_float64(torch.from_numpy(self._feeds[inputs[0]]))
        values[self.OUTPUT] = [_as_float64(torch.from_numpy(np.asarray(a))) for a in arrays[: len(self._output_names)]]
        return values

    def _segment_inputs(self, nodes: Collection[str]) -> dict[str, str]:
        """ONNX value read by the segment from outside -> the internal node producing it."""
        inside = {i for node in nodes for i in self._onnx_nodes.get(node, [])}
        produced = {v for i in inside for v in self.model.proto.graph.node[i].output}
        producer = {v: node for node, values in self._values.items() for v in values}
        needed: dict[str, str] = {}
        for i in inside:
            for value in self.model.proto.graph.node[i].input:
                if value and value not in produced and value not in self._initializers:
                    if value not in producer:
                        raise KeyError(f"ONNX value '{value}' has no producing node")
                    needed[value] = producer[value]
        return needed

    def boundary(self, nodes: Collection[str]) -> set[str]:
        return set(self._segment_inputs(nodes).values())

    def run_segment(
        self,
        overrides: Mapping[str, torch.Tensor],
        nodes: Collection[str],
        capture: Collection[str],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        from onnx import utils

        inputs = self._segment_inputs(nodes)
        outputs = list(dict.fromkeys(v for node in capture for v in self._values.get(node, [])))
        proto = copy.deepcopy(self.model.with_tensors(overrides))
        present = {v.name for v in proto.graph.value_info}
        proto.graph.value_info.extend(
            self._info[v] for v in [*inputs, *outputs] if v in self._info and v not in present
        )
        sub = utils.Extractor(proto).extract_model(list(inputs), outputs)
        feeds = {}
        for value, node in inputs.items():
            given_value = given[node]
            tensors = given_value if isinstance(given_value, list) else [given_value]
            position = self._values[node].index(value) if len(tensors) > 1 else 0
            dtype = helper_dtype(self._info.get(value))
            feeds[value] = tensors[position].detach().cpu().numpy().astype(dtype)
        arrays = self._session(sub).run(outputs, feeds)
        return self._collect(outputs, arrays, capture)


def _static_bytes(infos: Iterable[Any], inputs: Sequence[Any]) -> int:
    """Bytes the values with sizes known by shape inference hold as float64 captures, inputs included."""
    held = sum(int(x.numel()) * 8 for x in inputs if torch.is_tensor(x))
    for info in infos:
        dims = info.type.tensor_type.shape.dim if info.type.HasField("tensor_type") else []
        if dims and all(d.HasField("dim_value") for d in dims):
            held += math.prod(d.dim_value for d in dims) * 8
    return held


def helper_dtype(info: Any) -> Any:
    from onnx import helper

    if info is None or not info.type.tensor_type.elem_type:
        return np.float32
    return helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)


def _as_float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.is_floating_point() else tensor


def graph_from_onnx(model: Any, example_inputs: Sequence[Any] | None = None, seed: int = 0) -> Graph:
    """Convert an ONNX model; verification runs in onnxruntime in float32 (runner_dtype)."""
    try:
        normalized = normalize(model)
        converter = _Converter(normalized)
        nodes = converter.convert()
    except Exception as error:
        raise TraceError(f"cannot convert the ONNX graph: {describe(error)}") from None
    tensors = dict(converter.tensors)
    # Initializers that no node uses as a parameter stay available under their own names.
    for key, array in converter.arrays.items():
        if key not in tensors and np.issubdtype(array.dtype, np.floating):
            tensors[key] = torch.from_numpy(np.array(array, copy=True))
    onnx_model = OnnxModel(normalized, converter.encodings)
    graph = Graph(nodes, tensors, "onnx")
    # Kept on the graph for writers of new initializers (balance); other front-ends have none.
    graph.onnx_model = onnx_model  # type: ignore[attr-defined]
    used = {key for node in nodes.values() for key in node.params.values()}
    graph.parameter_count = int(sum(tensors[key].numel() for key in used if key in tensors))
    inputs = tuple(example_inputs) if example_inputs is not None else default_inputs(normalized, seed)
    try:
        graph.runner = OnnxRunner(onnx_model, converter, inputs)
        graph.runner({})
    except InputError:  # a run larger than memory: said, not silently skipped
        raise
    except Exception as error:
        graph.runner = None
        graph.runner_note = (
            f"the model does not run on its default input (dynamic sizes 1; give --input-shape): {describe(error)}"
        )
        if example_inputs is not None:
            shapes = ";".join(",".join(map(str, x.shape)) for x in inputs if torch.is_tensor(x))
            raise InputError(f"the ONNX model does not run on inputs of shape {shapes}: {describe(error)}") from None
    return graph
