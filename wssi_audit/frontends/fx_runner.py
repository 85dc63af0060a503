"""Running a torch.fx GraphModule (a symbolic trace, or a torch.export program's module) for the
analyses: whole, or one segment of it on given boundary values, with some tensors replaced.

Internal node names are the fx node names (both fx front-ends keep them), so a segment is a set of
internal node names. The graph runs on private float64 copies of its tensors, made on first use:
torch.export's graphs (every tensor read through get_attr) run as they are, a symbolic trace whose
module calls own tensors runs as a converted deep copy.
"""

from __future__ import annotations

import copy
import functools
import operator
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..ir import Runner


class _Evaluate(nn.Module):
    """Holds the GraphModule so that torch.func.functional_call can swap its tensors for one run."""

    def __init__(self, gm: fx.GraphModule, functional: bool, targets: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.gm = gm
        # get_attr is looked up at run time: it sees the swapped tensors
        self.schedule = _Schedule(gm, functional, targets)

    def forward(self, plan: _Plan, inputs: Sequence[Any]) -> dict[str, Any]:
        return plan.execute(self.schedule, inputs)


class _Schedule:
    """A GraphModule's nodes in order, each one's position and last reader: worked out once, not
    per run (a self-check runs a graph's segments dozens of times). `functional`: no node writes
    into a tensor, so given and kept values need no copies. `targets`: node name -> the operator
    run in place of the node's own (an in-place op's out-of-place twin), the graph left as it is."""

    def __init__(self, gm: fx.GraphModule, functional: bool, targets: Mapping[str, Any] | None = None) -> None:
        self.gm = gm
        self.targets = {node: targets[node.name] for node in gm.graph.nodes if node.name in (targets or {})}
        self.nodes = list(gm.graph.nodes)
        self.position = {node.name: index for index, node in enumerate(self.nodes)}
        self.last_use: dict[fx.Node, int] = {}
        for index, node in enumerate(self.nodes):
            for source in node.all_input_nodes:
                self.last_use[source] = index
        self.placeholders = [node for node in self.nodes if node.op == "placeholder"]
        self.interpreter = fx.Interpreter(gm)
        self.functional = functional

    def order(self, needed: set[str] | None) -> list[fx.Node]:
        """The nodes a run evaluates, placeholders first (they bind the inputs in order)."""
        if needed is None:
            return self.nodes
        chosen = sorted(self.position[name] for name in needed if name in self.position)
        return [*self.placeholders, *(self.nodes[i] for i in chosen if self.nodes[i].op != "placeholder")]


class _Plan:
    """Which fx nodes to evaluate (None: all), which values are given, which to keep."""

    def __init__(self, needed: set[str] | None, given: Mapping[str, Any], capture: Collection[str]) -> None:
        self.needed, self.given, self.capture = needed, given, set(capture)

    def execute(
        self, schedule: _Schedule, inputs: Sequence[Any], attributes: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Run the plan; `attributes`: values for get_attr targets, in place of the module's own."""
        interpreter = schedule.interpreter
        keep = _same if schedule.functional else _copy
        env: dict[fx.Node, Any] = {}
        interpreter.env = env
        flat = iter(torch.utils._pytree.tree_flatten(tuple(inputs))[0])
        attributes = attributes or {}
        kept: dict[str, Any] = {}
        try:
            for node in schedule.order(self.needed):
                if node.op == "placeholder":
                    env[node] = next(flat, None)
                elif node.name in self.given:
                    env[node] = keep(self.given[node.name])  # the segment may write into it in place
                elif node.op == "output":
                    kept[node.name] = interpreter.fetch_args_kwargs_from_env(node)[0][0]
                elif node.op == "get_attr" and node.target in attributes:
                    env[node] = attributes[node.target]
                elif node in schedule.targets:
                    args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
                    env[node] = schedule.targets[node](*args, **kwargs)
                else:
                    env[node] = interpreter.run_node(node)
                if node.name in self.capture and node in env:
                    kept[node.name] = keep(env[node])  # later in-place ops (relu_, +=) must not change it
                index = schedule.position[node.name]
                for source in node.all_input_nodes:
                    if schedule.last_use.get(source) == index and source.op != "placeholder":
                        env.pop(source, None)
        finally:
            interpreter.env = {}
        return kept


def _attribute_aliases(gm: fx.GraphModule) -> dict[str, list[str]] | None:
    """Each get_attr target -> every get_attr target holding the same tensor (tied weights), when
    the graph reads all its tensors through get_attr; None when a called submodule owns tensors of
    its own (a symbolic trace's leaf modules): then only functional_call can swap them."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            owner = gm.get_submodule(str(node.target))
            if next(owner.parameters(), None) is not None or next(owner.buffers(), None) is not None:
                return None
    targets: dict[int, list[str]] = {}
    for target, value in _attribute_tensors(gm).items():
        targets.setdefault(id(value), []).append(target)
    return {target: group for group in targets.values() for target in group}


def _attribute_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """get_attr target -> the tensor it reads, for every get_attr node that reads a tensor."""
    found: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if torch.is_tensor(value):
                found[str(node.target)] = value
    return found


def _private_attributes(gm: fx.GraphModule, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every get_attr target's tensor as a private copy (floating point ones in `dtype`); a tensor
    read under two names (tied weights) stays one tensor."""
    copies: dict[int, torch.Tensor] = {}
    found = {}
    for target, tensor in _attribute_tensors(gm).items():
        if id(tensor) not in copies:
            value = tensor.detach()
            copies[id(tensor)] = value.to(dtype, copy=True) if value.is_floating_point() else value.clone()
        found[target] = copies[id(tensor)]
    return found


def _copy(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, value)


def _same(value: Any) -> Any:
    return value


def _writes_nothing(target: Any) -> bool:
    """An ATen operator none of whose overloads writes into an argument (schema alias info), or
    getitem; anything else (a Python function, a higher-order op, `operator.iadd`) may."""
    if target is operator.getitem:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable
    if isinstance(target, torch._ops.OpOverloadPacket):
        return not any(getattr(target, name)._schema.is_mutable for name in target.overloads())
    return False


def _is_guards(module: nn.Module) -> bool:
    """torch.export's input-shape assertions (torch >= 2.9), called as a module that has no tensors.
    Looked up only where torch.export._unlift is loaded: without it no such module can exist, and
    importing it costs a second (it imports torch._dynamo)."""
    unlift = sys.modules.get("torch.export._unlift")
    guards = getattr(unlift, "GuardsFn", None)
    return guards is not None and isinstance(module, guards)


def _reads_only(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    if node.op == "call_function":
        return _writes_nothing(node.target)
    return node.op == "call_module" and _is_guards(gm.get_submodule(str(node.target)))


def _fresh(node: fx.Node) -> bool:
    """The node's value is storage of its own: an ATen op none of whose results aliases an argument
    (or an item of such an op's tuple)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and all(r.alias_info is None for r in target._schema.returns)


def _out_of_place_variant(target: Any) -> Any:
    """aten.relu_.default -> aten.relu.default: an op that writes only its first argument and
    returns it, and has an out-of-place twin taking the same arguments; else None."""
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.name.endswith("_"):
        return None
    arguments, returns = target._schema.arguments, target._schema.returns
    writes = [a.alias_info is not None and a.alias_info.is_write for a in arguments]
    if not arguments or not writes[0] or any(writes[1:]) or len(returns) != 1 or returns[0].alias_info is None:
        return None
    name = target._schema.name.split("::")[-1][:-1]
    twin = getattr(getattr(torch.ops.aten, name, None), target._overloadname, None)
    if twin is None or [a.name for a in twin._schema.arguments] != [a.name for a in arguments]:
        return None
    return twin if not twin._schema.is_mutable else None


def in_place_conversions(gm: fx.GraphModule) -> dict[str, Any] | None:
    """Node name -> out-of-place twin for each in-place op of torch.export's graphs (relu_, add_),
    when every write can be removed without changing any value: the written tensor is fresh
    storage, nothing reads it after the write, and nothing made a view of it before. None when some
    node may still write (a view, a later reader, a module call): then no op is converted."""
    nodes = list(gm.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    conversions: dict[str, Any] = {}
    for node in nodes:
        if _reads_only(gm, node):
            continue
        twin = _out_of_place_variant(node.target) if node.op == "call_function" else None  # a module may write
        written = node.args[0] if node.args else None
        if (
            twin is None
            or not isinstance(written, fx.Node)
            or not (written.name in conversions or _fresh(written))
            or any(position[user] > position[node] or not _fresh(user) for user in written.users if user is not node)
        ):
            return None
        conversions[node.name] = twin
    return conversions


def _convert(gm: fx.GraphModule, conversions: Mapping[str, Any]) -> None:
    for node in gm.graph.nodes:
        if node.name in conversions:
            node.target = conversions[node.name]
    if conversions:
        gm.recompile()


def functionalize(gm: fx.GraphModule) -> bool:
    """Convert `gm`'s in-place ops (`in_place_conversions`) in place: True when it then writes
    nothing, so runs can share values without copies; a graph that still would is left as it was."""
    conversions = in_place_conversions(gm)
    if conversions is not None:
        _convert(gm, conversions)
    return conversions is not None


def _converted_copy(gm: fx.GraphModule, dtype: torch.dtype, share: bool = False) -> fx.GraphModule:
    """deepcopy(gm).to(dtype) without first copying every tensor in its own dtype; `share`: tensors
    already in `dtype` are shared (detached, no gradient), for a run that writes into none of them."""
    memo: dict[int, Any] = {}
    for tensor in [*gm.parameters(), *gm.buffers()]:
        if id(tensor) in memo:
            continue
        value = tensor.detach()
        if value.is_floating_point():
            value = value.to(dtype, copy=not share)
        elif not share:
            value = value.clone()
        memo[id(tensor)] = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
    return copy.deepcopy(gm, memo).to(dtype).eval()


class FxRunner(Runner):
    """Runner over a GraphModule whose fx node names are the internal graph's node names."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        dtype: torch.dtype = torch.float64,
        absorbed: Mapping[str, str] | None = None,
    ) -> None:
        self._source = gm
        # fx nodes the internal graph reads through (torch 2.4's BatchNorm getitem, a clone) ->
        # the internal node they belong to: a segment holding that node computes them too
        self._absorbed = dict(absorbed or {})
        self._original_inputs = tuple(example_inputs)
        self._inputs = self._original_inputs
        self.dtype = dtype
        self._module: _Evaluate | None = None
        self._output = next(node.name for node in gm.graph.nodes if node.op == "output")
        self._by_name = {node.name: node for node in gm.graph.nodes}
        # fx nodes computed from parameters and constants alone (core ATen's permute(weight) of a
        # Linear): a segment recomputes them, so that a shifted weight reaches the segment
        self._from_parameters: set[str] = set()
        for node in gm.graph.nodes:
            sources = node.all_input_nodes
            if (
                node.op == "call_function"
                and sources
                and all(s.op == "get_attr" or s.name in self._from_parameters for s in sources)
            ):
                self._from_parameters.add(node.name)
        self._keys: set[str] | None = None
        self._aliases: dict[str, list[str]] | None = None
        # where every tensor is read through get_attr: their private copies, and the source graph
        # runs as it is (no copy of the module)
        self._attributes: dict[str, torch.Tensor] | None = None
        self._float32_module: fx.GraphModule | None = None  # differentiable()'s copy, where nothing writes
        self._proven = False  # a first run succeeded in `dtype`

    @functools.cached_property
    def _conversions(self) -> dict[str, Any] | None:
        """The source graph's in-place ops that both private copies run out of place (worked out once)."""
        return in_place_conversions(self._source)

    def _ready(self) -> _Evaluate:
        """The graph to run and its tensors in `dtype`: where the graph reads every tensor, and
        nothing but tensors, through get_attr (torch.export's graphs), the source graph itself with
        private copies of its tensors and in-place ops run as their twins; else (a module call
        owns tensors, a subgraph is read) a converted deep copy."""
        if self._module is None:
            source, conversions = self._source, self._conversions
            self._aliases = _attribute_aliases(source)
            # a get_attr of a subgraph (a higher-order op's) may hold tensors of its own: copy then
            direct = self._aliases is not None and all(
                n.op != "get_attr" or str(n.target) in self._aliases for n in source.graph.nodes
            )
            if direct:
                self._attributes = _private_attributes(source, self.dtype)
                self._module = _Evaluate(source, conversions is not None, conversions)
            else:
                self._attributes = None
                module = _converted_copy(source, self.dtype)
                if conversions is not None:
                    _convert(module, conversions)
                self._module = _Evaluate(module, conversions is not None)
            self._keys = {k for k, _ in source.named_parameters()} | {k for k, _ in source.named_buffers()}
            self._inputs = tuple(
                x.to(self.dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in self._original_inputs
            )
        return self._module

    def _call(self, overrides: Mapping[str, torch.Tensor], plan: _Plan) -> dict[str, Any]:
        """One run; a model that cannot run in float64 (e.g. a custom kernel) runs in float32."""
        try:
            values = self._call_in_dtype(overrides, plan)
        except Exception:
            if self._proven or self.dtype != torch.float64:
                raise
            self.dtype, self._module = torch.float32, None
            values = self._call_in_dtype(overrides, plan)
        self._proven = True
        return values

    def _call_in_dtype(self, overrides: Mapping[str, torch.Tensor], plan: _Plan) -> dict[str, Any]:
        from torch.func import functional_call

        module = self._ready()
        assert self._keys is not None
        unknown = set(overrides) - self._keys
        if unknown:
            raise KeyError(f"tensors not in the traced module: {', '.join(sorted(unknown)[:5])}")
        if self._attributes is not None and self._aliases is not None:
            # a tensor no get_attr reads has no alias: replacing it changes nothing
            attributes = {**self._attributes}
            attributes.update((a, v.to(self.dtype)) for k, v in overrides.items() for a in self._aliases.get(k, ()))
            with torch.no_grad():
                return plan.execute(module.schedule, self._inputs, attributes)
        swapped = {f"gm.{k}": v.to(self.dtype) for k, v in overrides.items()}
        with torch.no_grad():
            return functional_call(module, swapped, (plan, self._inputs), strict=False)

    def run(self, overrides: Mapping[str, torch.Tensor], capture: Collection[str] = ()) -> dict[str, Any]:
        values = self._call(overrides, _Plan(None, {}, capture))
        values[self.OUTPUT] = values.pop(self._output)
        return values

    def boundary(self, nodes: Collection[str]) -> set[str]:
        return self._closure(nodes)[1]

    def _closure(self, nodes: Collection[str]) -> tuple[set[str], set[str]]:
        """fx nodes to evaluate for a segment (it, plus the parameters and placeholders it reads),
        and the computed values it reads from outside (the boundary)."""
        unknown = [name for name in nodes if name not in self._by_name]
        if unknown:  # e.g. an op inlined from an autocast block: not a node of the module that runs
            raise KeyError(f"segment nodes not in the traced module: {', '.join(sorted(unknown)[:5])}")
        needed, given = set(nodes), set()
        stack = [self._by_name[name] for name in nodes]
        while stack:
            node = stack.pop()
            for source in node.all_input_nodes:
                if source.name in needed or source.name in given:
                    continue
                if (
                    source.op in ("get_attr", "placeholder")
                    or source.name in self._from_parameters
                    or self._absorbed.get(source.name) in nodes
                ):
                    needed.add(source.name)
                    stack.append(source)
                else:
                    given.add(source.name)
        return needed, given

    def run_segment(
        self,
        overrides: Mapping[str, torch.Tensor],
        nodes: Collection[str],
        capture: Collection[str],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        needed, boundary = self._closure(nodes)
        missing = boundary - set(given)
        if missing:
            raise KeyError(f"segment needs values of {', '.join(sorted(missing)[:5])}")
        return self._call(overrides, _Plan(needed | boundary, {k: given[k] for k in boundary}, capture))

    def differentiable(self) -> tuple[Any, tuple[torch.Tensor, ...]] | None:
        """The float32 copy is made once per runner where no node writes into a tensor (then no run
        can change it, and it shares the source's float32 weights anyway); a graph that writes gets
        a fresh copy per call."""
        conversions = self._conversions
        module = self._float32_module if conversions is not None else None
        if module is None:
            # shared weights only where no node writes into a tensor; else a copy
            module = _converted_copy(self._source, torch.float32, share=conversions is not None)
            if conversions is not None:
                _convert(module, conversions)
                self._float32_module = module
        inputs = tuple(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in self._original_inputs)
        return module, inputs

    def linearization(self, function: Any, inputs: tuple[Any, ...]) -> tuple[list[torch.Tensor], Any] | None:
        """The tangent interpreter (fx_tangent) on the GraphModule `differentiable()` returned."""
        if not isinstance(function, fx.GraphModule):
            return None
        from .fx_tangent import linearize

        found = linearize(function, inputs)
        return None if found is None else (found.outputs, found.push)
