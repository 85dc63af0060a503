"""A scanned .pt2 archive read into an ExportedProgram without torch.export.load.

torch.export.load imports torch._dynamo (about a second) and decodes the JSON through dataclasses
and type hints (half a second for ResNet-50): an audit of a .pt2 spent more time there than in
most of its analyses. This reader builds the same ExportedProgram from the archive's JSON and raw
tensor bytes for what export writes for ordinary models: static shapes, registered operators
(`torch.ops.<namespace>.<op>.<overload>`), tensor weights and constants. Anything else (symbolic
shapes, higher-order ops, custom or opaque objects, pickled payloads, mutations, another schema
major or operator version, guards) raises `Unsupported`, and the caller uses torch.export.load.

One difference, by design: a node's value metadata (`meta["val"]`, shapes, strides, dtypes) is a
meta-device tensor, not a fake tensor (a FakeTensorMode imports torch._dynamo too). That is all
the analyses read; a program that is saved or re-exported comes from torch.export.load
(loading.load_model's `for_analysis`).

It runs nothing from the file: a target resolves only to an operator torch already has
registered, tensors are views of payload bytes whose sizes are checked, and the sample inputs are
read by torch's weights_only unpickler. tests/test_pt2_reader.py compares what it builds with
torch.export.load's program on real models.
"""

from __future__ import annotations

import io
import json
import keyword
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch._C._export import pt2_archive_constants as layout
from torch._export import verifier as torch_verifier
from torch.export import exported_program as ep
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

from .safe_archive import VerifiedZip
from .safe_graph import resolve_target

MODEL = "model"  # the program torch.export.load returns
SCHEMA_MAJOR = 8  # torch.export's serialized schema, major version, in torch 2.9 to 2.14

# torch._export.serde.schema's enums (the file stores their integers); torch's own tables live in
# torch._export.serde.serialize, whose import costs the second this module saves. Checked
# against those tables in the tests.
DTYPES = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    9: torch.complex32,
    10: torch.complex64,
    11: torch.complex128,
    12: torch.bool,
    13: torch.bfloat16,
}
LAYOUTS = {7: torch.strided}
MEMORY_FORMATS = {
    1: torch.contiguous_format,
    2: torch.channels_last,
    3: torch.channels_last_3d,
    4: torch.preserve_format,
}
POSITIONAL, KEYWORD = 1, 2  # ArgumentKind


class Unsupported(Exception):
    """The archive holds something this reader does not build: torch.export.load reads it instead."""


def read_program(archive: VerifiedZip) -> ep.ExportedProgram:
    """The archive's program as torch.export.load would return it (values' metadata on the meta
    device); `Unsupported` where this reader does not build it."""
    names = set(archive.names)
    document = _json(archive, layout.MODELS_FILENAME_FORMAT.format(MODEL), names)
    _require_plain(document, archive, names)
    serialized = document["graph_module"]
    state_dict = _payloads(archive, layout.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL), layout.WEIGHTS_DIR, names)
    constants = _payloads(archive, layout.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL), layout.CONSTANTS_DIR, names)
    signature = _signature(serialized["signature"])
    graph = _GraphBuilder(serialized["graph"]).build()
    verifiers = [torch_verifier.load_verifier(v) for v in document.get("verifiers", [])] or [torch_verifier.Verifier]
    if not set(verifiers) <= {torch_verifier.Verifier, torch_verifier.TrainingIRVerifier}:
        raise Unsupported(f"verifiers {document.get('verifiers')}: another dialect's checks")
    program = _ReadProgram(
        root=nn.Module(),  # the graph reads every tensor as an input: nothing to hold
        graph=graph,
        graph_signature=signature,
        state_dict=state_dict,
        range_constraints={},
        module_call_graph=_module_call_graph(serialized["module_call_graph"]),
        example_inputs=_example_inputs(archive, names),
        constants=constants,
        verifiers=verifiers,
    )
    fields = serialized.get("treespec_namedtuple_fields") or {}
    program.graph_module.meta["treespec_namedtuple_fields"] = {k: v["field_names"] for k, v in fields.items()}
    return program


class _ReadProgram(ep.ExportedProgram):
    """An ExportedProgram whose construction checks it as torch's verifier does, but for the
    per-node value check: that one imports sympy (through torch.fx.experimental.symbolic_shapes),
    0.27 s of a ResNet-50 audit, to accept what every value this reader builds is (a meta tensor,
    a tuple of them, or None). tests/test_pt2_reader.py runs torch's own verifier on every program
    read there."""

    def validate(self) -> None:
        graph = self.graph_module.graph
        graph.lint()
        builtins = torch_verifier.Verifier().allowed_builtin_ops()  # read_program admits only torch's two dialects
        functional = any(verifier.dialect != "TRAINING" for verifier in self.verifiers)
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module", "call_method"):
                raise torch_verifier.SpecViolationError(f"{node.op} {node.target} in a read program")
            if node.op in ("placeholder", "call_function") and "val" not in node.meta:
                raise torch_verifier.SpecViolationError(f"Node.meta {node.name} is missing val field.")
            if node.op != "call_function":
                continue
            target = node.target
            if not isinstance(target, torch._ops.OpOverload) and target not in builtins:
                raise torch_verifier.SpecViolationError(f"Operator '{target}' is not an allowed operator type")
            if functional and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
                raise torch_verifier.SpecViolationError(f"operator '{target}' is not functional")
        torch_verifier._verify_exported_program_module_call_graph(self)
        torch_verifier._verify_exported_program_signature(self)


def _json(archive: VerifiedZip, member: str, names: set[str]) -> Any:
    if member not in names:
        raise Unsupported(f"no {member}")
    try:
        return json.loads(archive.read(member))
    except ValueError as error:
        raise Unsupported(f"{member}: {error}") from None


def _require_plain(document: Mapping[str, Any], archive: VerifiedZip, names: set[str]) -> None:
    """What torch.export.load would check or do beyond building the graph: refused here."""
    byteorder = archive.read("byteorder").decode(errors="replace").strip() if "byteorder" in names else "little"
    if byteorder != "little":
        raise Unsupported(f"byte order {byteorder}")
    version = document.get("schema_version") or {}
    if version.get("major") != SCHEMA_MAJOR:
        raise Unsupported(f"schema version {version}")
    if (document.get("opset_version") or {}).get("aten") != torch._C._get_max_operator_version():
        raise Unsupported("another ATen operator version (torch would upgrade the graph)")
    if document.get("range_constraints") or document.get("guards_code"):
        raise Unsupported("symbolic shapes or guards")
    graph = document["graph_module"]["graph"]
    for key in ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"):
        if graph.get(key):
            raise Unsupported(key)
    legacy = {f"{layout.WEIGHTS_DIR}{MODEL}.pt", f"{layout.CONSTANTS_DIR}{MODEL}.pt"}
    programs = {n for n in names if n.startswith(layout.MODELS_DIR)}
    if legacy & names or programs != {layout.MODELS_FILENAME_FORMAT.format(MODEL)}:
        raise Unsupported("legacy payload files or several programs")


def _tensor_meta(meta: Mapping[str, Any]) -> tuple[torch.dtype, list[int], list[int], int]:
    """(dtype, sizes, strides, storage offset) of a static, strided CPU tensor's metadata."""
    dtype = DTYPES.get(meta.get("dtype"))  # type: ignore[arg-type]
    if dtype is None or LAYOUTS.get(meta.get("layout")) is not torch.strided:  # type: ignore[arg-type]
        raise Unsupported(f"tensor dtype {meta.get('dtype')} or layout {meta.get('layout')}")
    if (meta.get("device") or {}).get("type") != "cpu":
        raise Unsupported("a tensor saved on another device")
    sizes, strides = [_int(s) for s in meta["sizes"]], [_int(s) for s in meta["strides"]]
    offset = _int(meta.get("storage_offset", {"as_int": 0}))
    if len(sizes) != len(strides) or min([*sizes, *strides, offset], default=0) < 0:
        raise Unsupported("tensor sizes and strides")
    return dtype, sizes, strides, offset


def _float(value: Any) -> float:
    """A float as torch's deserializer reads one: float(value) (strings included)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise Unsupported(f"a float argument {value!r}") from None


def _int(value: Mapping[str, Any]) -> int:
    if set(value) != {"as_int"} or type(value["as_int"]) is not int:
        raise Unsupported(f"a symbolic size {value}")
    return value["as_int"]


def _payloads(archive: VerifiedZip, config: str, directory: str, names: set[str]) -> dict[str, Any]:
    """FQN -> tensor, views of the payload bytes (aliases kept: entries naming one file share it)."""
    if config not in names:
        raise Unsupported(f"no {config}")
    entries = _json(archive, config, names).get("config")
    if not isinstance(entries, dict):
        raise Unsupported(f"{config} has no config table")
    flat: dict[str, torch.Tensor] = {}
    result: dict[str, Any] = {}
    for fqn, entry in entries.items():
        path = entry.get("path_name")
        if entry.get("use_pickle") is not False or not isinstance(path, str) or entry.get("tensor_meta") is None:
            raise Unsupported(f"payload {fqn} is pickled or not a tensor")
        if not path.startswith((layout.WEIGHT_FILENAME_PREFIX, layout.TENSOR_CONSTANT_FILENAME_PREFIX)):
            raise Unsupported(f"payload {fqn} ({path}) is an object")
        dtype, sizes, strides, offset = _tensor_meta(entry["tensor_meta"])
        if path not in flat:
            flat[path] = _flat_payload(archive.read(directory + path), dtype)
        storage = flat[path]
        if storage.dtype != dtype:
            raise Unsupported(f"payload {path} read as two dtypes")
        extent = offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1 if all(sizes) else 0
        if extent > storage.numel():
            raise Unsupported(f"payload {fqn} reaches past its {storage.numel()} elements")
        tensor = torch.as_strided(storage, sizes, strides, offset)
        requires_grad = bool(entry["tensor_meta"].get("requires_grad"))
        if entry.get("is_param"):
            result[fqn] = nn.Parameter(tensor, requires_grad=requires_grad)
        else:
            result[fqn] = tensor
    return result


def _flat_payload(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if len(data) % dtype.itemsize:
        raise Unsupported(f"a payload of {len(data)} bytes is not a whole number of {dtype} elements")
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)  # writable memory of its own


def _signature(serialized: Mapping[str, Any]) -> ExportGraphSignature:
    inputs = []
    for spec in serialized["input_specs"]:
        (kind, value), *more = spec.items()
        if more:
            raise Unsupported("an input specification of two kinds")
        if kind == "user_input":
            inputs.append(InputSpec(InputKind.USER_INPUT, _tensor_argument(value["arg"]), None))
        elif kind == "parameter":
            inputs.append(InputSpec(InputKind.PARAMETER, _tensor_argument(value), value["parameter_name"]))
        elif kind == "buffer":
            argument = _tensor_argument(value)
            inputs.append(InputSpec(InputKind.BUFFER, argument, value["buffer_name"], bool(value["persistent"])))
        elif kind == "tensor_constant":
            argument = _tensor_argument(value)
            inputs.append(InputSpec(InputKind.CONSTANT_TENSOR, argument, value["tensor_constant_name"]))
        else:
            raise Unsupported(f"an input of kind {kind}")
    outputs = []
    for spec in serialized["output_specs"]:
        (kind, value), *more = spec.items()
        if kind != "user_output" or more:
            raise Unsupported(f"an output of kind {kind} (a mutation or a gradient)")
        outputs.append(OutputSpec(OutputKind.USER_OUTPUT, _tensor_argument(value["arg"]), None))
    return ExportGraphSignature(input_specs=inputs, output_specs=outputs)


def _tensor_argument(value: Mapping[str, Any]) -> TensorArgument:
    """{"arg": {"name": x}, ...} or {"as_tensor": {"name": x}} -> TensorArgument(x)."""
    inner = value.get("as_tensor", value.get("arg"))
    if not isinstance(inner, dict) or set(inner) != {"name"} or not isinstance(inner["name"], str):
        raise Unsupported(f"an argument that is not a tensor: {value}")
    return TensorArgument(name=inner["name"])


def _operator(target: str) -> torch._ops.OpOverload:
    """'torch.ops.aten.conv2d.default' -> the registered overload, resolved as torch's loader
    resolves it (safe_graph.resolve_target); nothing is imported or evaluated."""
    found = resolve_target(target) if target.startswith("torch.ops.") else None
    if not isinstance(found, torch._ops.OpOverload):
        raise Unsupported(f"operator {target}")
    return found


class _GraphBuilder:
    """The serialized graph as an fx.Graph named and laid out as torch's deserializer lays it out."""

    def __init__(self, serialized: Mapping[str, Any]) -> None:
        self.serialized = serialized
        self.graph = fx.Graph()
        self.nodes: dict[str, fx.Node] = {}
        self.metas = serialized["tensor_values"]

    def build(self) -> fx.Graph:
        for argument in self.serialized["inputs"]:
            if set(argument) != {"as_tensor"}:
                raise Unsupported(f"a graph input {argument}")
            name = argument["as_tensor"]["name"]
            placeholder = self.graph.placeholder(name)
            placeholder.name = name
            self._bind(name, placeholder)
        for node in self.serialized["nodes"]:
            self._node(node)
        outputs = [self._input(argument) for argument in self.serialized["outputs"]]
        if self.serialized.get("is_single_tensor_return"):
            if len(outputs) != 1:
                raise Unsupported("a single return of several values")
            result = self.graph.output(outputs[0])
            result.meta["val"] = outputs[0].meta["val"]
        else:
            result = self.graph.output(tuple(outputs))
            result.meta["val"] = tuple(o.meta["val"] if isinstance(o, fx.Node) else o for o in outputs)
        return self.graph

    def _bind(self, name: str, node: fx.Node) -> None:
        if name in self.nodes:
            raise Unsupported(f"value {name} defined twice")
        if name not in self.metas:
            raise Unsupported(f"no metadata for value {name}")
        node.name = name
        self.nodes[name] = node
        dtype, sizes, strides, _ = _tensor_meta(self.metas[name])
        requires_grad = bool(self.metas[name].get("requires_grad"))
        node.meta["val"] = torch.empty_strided(sizes, strides, dtype=dtype, device="meta", requires_grad=requires_grad)

    def _node(self, serialized: Mapping[str, Any]) -> None:
        target = _operator(serialized["target"])
        args, kwargs = self._arguments(target, serialized["inputs"])
        outputs = serialized["outputs"]
        single = len(outputs) == 1 and set(outputs[0]) == {"as_tensor"}
        name = serialized.get("name") or (outputs[0]["as_tensor"]["name"] if single else None)
        node = self.graph.create_node("call_function", target, args, kwargs, name)
        metadata = _metadata(serialized.get("metadata") or {})
        if single:
            self._bind(outputs[0]["as_tensor"]["name"], node)
        elif len(outputs) == 1 and set(outputs[0]) == {"as_none"}:
            node.meta["val"] = None
            node._rename(f"{self.graph._target_to_str(node.target)}_unused")
        elif outputs:
            items = outputs[0]["as_tensors"] if len(outputs) == 1 and "as_tensors" in outputs[0] else outputs
            values = [self._getitem(node, index, item, metadata) for index, item in enumerate(items)]
            node.meta["val"] = tuple(values)
            self.nodes.setdefault(node.name, node)
        node.meta.update(metadata)
        node.meta.setdefault("nn_module_stack", {})

    def _getitem(self, producer: fx.Node, index: int, item: Mapping[str, Any], metadata: dict[str, Any]) -> Any:
        """One value of a multi-output op, as its own getitem node (what fx and torch's loader do)."""
        if set(item) == {"name"}:  # an entry of as_tensors
            item = {"as_tensor": item}
        if set(item) == {"as_tensor"}:
            name = item["as_tensor"]["name"]
            node = self.graph.create_node("call_function", operator.getitem, (producer, index), name=name)
            self._bind(name, node)
        elif set(item) == {"as_none"}:
            node = self.graph.create_node("call_function", operator.getitem, (producer, index), name="as_none")
            node.meta["val"] = None
        else:
            raise Unsupported(f"an output {item}")
        node.meta.update(metadata)
        return node.meta["val"]

    def _arguments(self, target: torch._ops.OpOverload, inputs: list[Mapping[str, Any]]) -> tuple[tuple, dict]:
        """Positional and keyword arguments placed by the schema, as torch's deserializer does."""
        given = {entry["name"]: (self._input(entry["arg"]), entry.get("kind")) for entry in inputs}
        schema_names = {argument.name for argument in target._schema.arguments}
        if set(given) - schema_names:
            raise Unsupported(f"arguments {sorted(set(given) - schema_names)} not in {target}'s schema")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for argument in target._schema.arguments:
            if argument.name in given:
                value, kind = given[argument.name]
                if kind == POSITIONAL:
                    args.append(value)
                    continue
                if kind == KEYWORD and not keyword.iskeyword(argument.name):
                    kwargs[argument.name] = value
                    continue
            if (not argument.has_default_value() and not argument.kwarg_only) or keyword.iskeyword(argument.name):
                if argument.name not in given or kwargs:
                    raise Unsupported(f"{target}: argument {argument.name} missing or out of order")
                args.append(given[argument.name][0])
            elif argument.name in given:
                kwargs[argument.name] = given[argument.name][0]
        return tuple(args), kwargs

    def _input(self, argument: Mapping[str, Any]) -> Any:
        if len(argument) != 1:
            raise Unsupported(f"an argument {argument}")
        ((kind, value),) = argument.items()
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return self._value(value["name"])
        if kind == "as_tensors":
            return [self._value(v["name"]) for v in value]
        if kind == "as_optional_tensors":
            return [None if set(v) == {"as_none"} else self._value(v["as_tensor"]["name"]) for v in value]
        if kind == "as_float":  # torch writes NaN and the infinities as "NaN", "Infinity", "-Infinity"
            return _float(value)
        if kind == "as_floats":
            return [_float(v) for v in value]
        if kind in ("as_int", "as_bool", "as_string"):
            return value
        if kind in ("as_ints", "as_bools", "as_strings"):
            return list(value)
        if kind == "as_scalar_type" and value in DTYPES:
            return DTYPES[value]
        if kind == "as_memory_format" and value in MEMORY_FORMATS:
            return MEMORY_FORMATS[value]
        if kind == "as_layout" and value in LAYOUTS:
            return LAYOUTS[value]
        if kind == "as_device":
            index = value.get("index")
            return torch.device(value["type"]) if index is None else torch.device(value["type"], index)
        raise Unsupported(f"an argument of kind {kind}")

    def _value(self, name: str) -> fx.Node:
        if name not in self.nodes:
            raise Unsupported(f"value {name} used before it is defined")
        return self.nodes[name]


def _metadata(serialized: Mapping[str, str]) -> dict[str, Any]:
    """The node metadata the analyses read: module stack (scopes) and stack trace; the rest is
    provenance torch re-derives or that no analysis reads."""
    result: dict[str, Any] = {}
    if serialized.get("stack_trace"):
        result["stack_trace"] = serialized["stack_trace"]
    stack = serialized.get("nn_module_stack")
    if stack:
        entries = {}
        for item in stack.split(";"):
            parts = _split_top_level(item)
            if len(parts) != 3:
                raise Unsupported(f"a module stack entry {item}")
            key, path, kind = parts
            entries[key] = (path, kind)
        result["nn_module_stack"] = entries
    if serialized.get("torch_fn"):
        result["torch_fn"] = tuple(serialized["torch_fn"].split(";"))
    return result


def _split_top_level(text: str) -> list[str]:
    """'a,b[c,d],e' -> ['a', 'b[c,d]', 'e']: commas inside brackets or parentheses stay."""
    parts, start, depth = [], 0, 0
    for index, char in enumerate(text):
        if char in "[(":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def _module_call_graph(serialized: list[Mapping[str, Any]]) -> list[ep.ModuleCallEntry]:
    from torch.utils._pytree import treespec_loads

    entries = []
    for entry in serialized:
        signature = entry.get("signature")
        if signature:
            signature = ep.ModuleCallSignature(
                inputs=[_argument_spec(a) for a in signature["inputs"]],
                outputs=[_argument_spec(a) for a in signature["outputs"]],
                in_spec=treespec_loads(signature["in_spec"]),
                out_spec=treespec_loads(signature["out_spec"]),
                forward_arg_names=signature.get("forward_arg_names") or None,
            )
        entries.append(ep.ModuleCallEntry(fqn=entry["fqn"], signature=signature or None))
    return entries


def _argument_spec(argument: Mapping[str, Any]) -> Any:
    if set(argument) == {"as_tensor"}:
        return TensorArgument(name=argument["as_tensor"]["name"])
    raise Unsupported(f"a module call argument {argument}")


def _example_inputs(archive: VerifiedZip, names: set[str]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    member = layout.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL)
    if member not in names:
        return None
    value = torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
        raise Unsupported("sample inputs that are not (args, kwargs)")
    return tuple(value[0]), value[1]
