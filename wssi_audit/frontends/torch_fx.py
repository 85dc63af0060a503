"""torch.fx symbolic tracing front-end, with leaf fallback for untraceable submodules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..errors import describe
from ..ir import Graph, Unanalyzed
from .fx_convert import FxConverter
from .fx_runner import FxRunner


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module, leaves: set[str]) -> fx.GraphModule:
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph)


def find_untraceable(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """Deepest submodules that fail symbolic tracing on their own: path -> reason."""
    found: dict[str, str] = {}
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if fx.Tracer().is_leaf_module(child, path):
            continue
        try:
            _trace(child, set())
        except Exception as error:
            inner = find_untraceable(child, path)
            if inner:
                # Retry the child with its own bad parts as leaves; if it still fails, it is a leaf.
                try:
                    _trace(child, {p[len(path) + 1 :] for p in inner})
                    found.update(inner)
                except Exception:
                    found[path] = describe(error)
            else:
                found[path] = describe(error)
    return found


def _tensor_nodes_by_running(
    gm: fx.GraphModule, example_inputs: Sequence[Any]
) -> tuple[set[str], dict[str, list[int]]]:
    """Run the traced module once and note which nodes produce tensors, and their shapes.

    The run uses fake tensors (shapes only, no arithmetic): a real ResNet-50 forward at 224x224
    costs more than the rest of the analysis. A model that fake tensors cannot run (e.g. one that
    reads a tensor's value) runs for real.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    tensor_nodes: set[str] = set()
    shapes: dict[str, list[int]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            leaves, _ = torch.utils._pytree.tree_flatten(result)
            if any(isinstance(leaf, torch.Tensor) for leaf in leaves):
                tensor_nodes.add(n.name)
            if isinstance(result, torch.Tensor):
                shapes[n.name] = [int(d) for d in result.shape]
            return result

    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        with torch.no_grad(), mode:
            Recorder(gm).run(*fake_inputs)
        return tensor_nodes, shapes
    except Exception:
        tensor_nodes.clear()
        shapes.clear()
    with torch.no_grad():
        Recorder(gm).run(*example_inputs)
    return tensor_nodes, shapes


def trace_fx(module: nn.Module, example_inputs: Sequence[Any] | None = None) -> Graph:
    """Symbolically trace `module`; untraceable submodules become opaque leaves.

    Raises the tracing error when the root's own forward cannot be traced.
    """
    module = module.eval()
    leaves: dict[str, str] = {}
    try:
        gm = _trace(module, set())
    except Exception as root_error:
        leaves = find_untraceable(module)
        if not leaves:
            raise
        try:
            gm = _trace(module, set(leaves))
        except Exception:
            raise root_error from None
    tensor_nodes, shapes = None, {}
    if example_inputs is not None:
        try:
            tensor_nodes, shapes = _tensor_nodes_by_running(gm, example_inputs)
        except Exception:
            tensor_nodes, shapes = None, {}
    fixed = dict(module.named_buffers())  # buffers (persistent or not) are fixed, not trained
    converter = FxConverter(module, {}, tensor_nodes, leaf_reasons=leaves, fixed=fixed, shapes=shapes)
    nodes = converter.convert(gm.graph)
    unanalyzed = [
        Unanalyzed(path, f"untraceable submodule, analysed as a black box ({reason})")
        for path, reason in leaves.items()
    ]
    tensors = dict(module.state_dict(keep_vars=False))
    runner = FxRunner(gm, example_inputs) if example_inputs is not None else None
    return Graph(nodes, tensors, "fx+leaves" if leaves else "fx", unanalyzed, runner)
