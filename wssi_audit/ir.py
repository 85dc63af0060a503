"""The one internal graph representation.

Every front-end (torch.fx symbolic tracing, torch.export, ONNX) produces a `Graph`;
every analysis consumes one and never asks which front-end ran.

A node works on activations. Its `inputs` are the activation-carrying nodes it reads,
in order; weights and buffers are not nodes but entries of `params` (role -> tensor key,
the key being the state_dict key the user knows, e.g. ``features.0.weight``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


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
    runner: Runner | None = None  # None when no example input is known, or the model did not run on it
    runner_note: str = "no example input"  # why there is no runner (read only when there is none)
    parameter_count: int = 0

    @property
    def runner_dtype(self) -> torch.dtype:
        return self.runner.dtype if self.runner is not None else torch.float64

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


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in the tensor. A finite sum proves it (a NaN or an Inf entry makes any sum
    non-finite) at a fraction of isfinite's cost; only a non-finite sum, which a large finite
    tensor can also give by overflow, takes the entry-by-entry test."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def leaves(value: Any) -> list[torch.Tensor]:
    """All floating-point tensors in a (nested) value, in order: what a numerical comparison reads."""
    return [t for t in flat_tensors(value) if t.is_floating_point()]


class Runner(ABC):
    """Runs the model on its example inputs with some tensors replaced (state_dict key -> tensor).

    Values are keyed by internal node name. Every front-end that can run its model provides one;
    the analyses (self-check, measured gradient, balance) only ever use this interface.
    """

    OUTPUT = "__output__"
    dtype: torch.dtype = torch.float64

    def __call__(self, overrides: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The model's flat outputs."""
        return leaves(self.run(overrides)[self.OUTPUT])

    @abstractmethod
    def run(self, overrides: Mapping[str, torch.Tensor], capture: Collection[str] = ()) -> dict[str, Any]:
        """The whole model: the values of the `capture` nodes, and the outputs under `OUTPUT`."""

    @abstractmethod
    def boundary(self, nodes: Collection[str]) -> set[str]:
        """Nodes outside `nodes` whose values a run of just `nodes` reads."""

    def differentiable(self) -> tuple[Callable[..., Any], tuple[torch.Tensor, ...]] | None:
        """(a float32 function of the example inputs that autograd can differentiate, those inputs),
        or None when the runtime has no autograd (onnxruntime)."""
        return None

    def linearization(
        self, function: Callable[..., Any], inputs: tuple[Any, ...]
    ) -> tuple[list[torch.Tensor], Callable[[tuple[torch.Tensor | None, ...]], list[torch.Tensor]]] | None:
        """J of `function` (as `differentiable()` returned it) at `inputs`, computed without autograd:
        (its floating-point outputs there, flat and in order; the map from a tangent per input, None
        where it is held fixed, to those outputs' tangents). None where this runner has no such map
        (an op without a tangent rule, a runtime without one): the analysis then differentiates
        autograd's backward, which costs three to four forwards per product where this costs one.
        The forward runs in the caller's grad mode: on inputs that require grad, the outputs carry
        autograd's graph of that same forward (the analysis runs the model once, not twice)."""
        return None

    @abstractmethod
    def run_segment(
        self,
        overrides: Mapping[str, torch.Tensor],
        nodes: Collection[str],
        capture: Collection[str],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Only `nodes`, reading their boundary from `given` (values of an earlier `run`)."""
