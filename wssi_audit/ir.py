"""The one internal graph representation.

Every front-end (torch.fx symbolic tracing, torch.export, ONNX) produces a `Graph`;
every analysis consumes one and never asks which front-end ran.

A node works on activations. Its `inputs` are the activation-carrying nodes it reads,
in order; weights and buffers are not nodes but entries of `params` (role -> tensor key,
the key being the state_dict key the user knows, e.g. ``features.0.weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Runs the model with some tensors replaced (state_dict key -> tensor), returns flat outputs.
Runner = Callable[[Mapping[str, torch.Tensor]], list[torch.Tensor]]


@dataclass
class Node:
    name: str
    op: str  # canonical op name, a key of ops.OP_TABLE (or an unclassified raw name)
    inputs: list[str] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # what the front-end saw, e.g. "aten.relu.default" or "torch.nn.Conv2d"
    scope: str = ""  # module path, e.g. "layer1.0.conv1"

    @property
    def label(self) -> str:
        """The name users see: the module path when known, else the node name."""
        return self.scope or self.name


@dataclass
class Unanalyzed:
    node: str
    reason: str


@dataclass
class Graph:
    nodes: dict[str, Node]  # in topological order
    tensors: Mapping[str, torch.Tensor]  # state_dict key -> tensor (parameters and buffers)
    method: str  # how the graph was obtained, e.g. "fx", "fx+leaves", "export", "onnx"
    unanalyzed: list[Unanalyzed] = field(default_factory=list)
    runner: Runner | None = None  # None when no example input is known
    runner_dtype: torch.dtype = torch.float64
    parameter_count: int = 0

    def consumers(self) -> dict[str, list[str]]:
        """Node name -> names of nodes reading its output (once per reading node)."""
        result: dict[str, list[str]] = {name: [] for name in self.nodes}
        for node in self.nodes.values():
            for source in dict.fromkeys(node.inputs):
                if source in result:
                    result[source].append(node.name)
        return result

    def outputs(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.op == "output"]

    def inputs(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.op == "input"]


def flat_tensors(value: Any) -> list[torch.Tensor]:
    """All tensors in a nested output structure, in order."""
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def make_module_runner(
    module: torch.nn.Module, example_inputs: Sequence[Any], dtype: torch.dtype = torch.float64
) -> Runner:
    """A runner over a private copy of `module` in `dtype` (float64 for exact checks).

    The copy is made on the first run, not here: an audit without verification never runs
    the model, and copying a large model to float64 is a good part of a fast audit's time.
    """
    import copy

    from torch.func import functional_call

    inputs = tuple(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in example_inputs)
    copies: list[torch.nn.Module] = []

    def run(overrides: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if not copies:
            copies.append(copy.deepcopy(module).to(dtype).eval())
        with torch.no_grad():
            out = functional_call(copies[0], {k: v.to(dtype) for k, v in overrides.items()}, inputs, strict=False)
        return flat_tensors(out)

    return run
