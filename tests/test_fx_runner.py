"""The fx runner's private copies: in-place ops turned out-of-place only where no value can change,
values shared between runs only when no node writes, and the user's model never touched."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from wssi_audit.frontends.fx_runner import FxRunner, functionalize

aten = torch.ops.aten


class InPlaceBlock(nn.Module):
    """torch.export keeps these as aten.relu_ and aten.add_ (as in torchvision's ResNets)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y = torch.relu_(y)
        y += x
        return self.head(torch.relu_(y).flatten(1))


def _exported() -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = InPlaceBlock().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 6, 6)
    return torch.export.export(model, (x,), strict=False).module(), x


def _writers(gm: fx.GraphModule) -> list[str]:
    return [
        str(n.target)
        for n in gm.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
    ]


def _hand_graph(after_write: str) -> fx.GraphModule:
    """x -> a = 2x -> relu_(a), with a view of `a` made before the write ("view") or `a` read after
    it ("reader"): either way an out-of-place relu would change a value."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(aten.mul.Tensor, (x, 2.0))
    view = graph.call_function(aten.view.default, (a, [-1])) if after_write == "view" else None
    written = graph.call_function(aten.relu_.default, (a,))
    if view is not None:
        result = graph.call_function(aten.add.Tensor, (view, 1.0))
    else:
        result = graph.call_function(aten.add.Tensor, (a, written))
    graph.output(result)
    return fx.GraphModule(nn.Module(), graph)


def test_exported_in_place_ops_become_out_of_place_with_the_same_values():
    gm, x = _exported()
    assert _writers(gm), "control: torch.export kept in-place ops, so the conversion has work to do"
    private = copy.deepcopy(gm)
    assert functionalize(private)
    assert not _writers(private)
    assert _writers(gm), "the source graph is left as it was"
    for _ in range(3):
        x = torch.randn_like(x) * 3
        with torch.no_grad():
            assert torch.equal(private(x), gm(x))


def test_a_view_or_a_later_reader_of_the_written_tensor_blocks_the_conversion():
    x = torch.randn(2, 3)
    for case in ("view", "reader"):
        gm = _hand_graph(case)
        expected = gm(x.clone())
        before = [str(n.target) for n in gm.graph.nodes]
        assert not functionalize(gm), case
        assert [str(n.target) for n in gm.graph.nodes] == before, "a refused graph is left as it was"
        # and the in-place semantics it keeps are the real ones: relu reached the view / the reader
        assert torch.equal(gm(x.clone()), expected)
        relu = (2 * x).relu()
        assert torch.equal(expected, relu.reshape(-1) + 1.0 if case == "view" else 2 * relu)


def test_a_module_call_anywhere_leaves_the_whole_graph_as_it_was():
    """A symbolic trace's module may write into its input: no op is converted, none is shared."""
    root = nn.Module()
    root.act = nn.ReLU(inplace=True)
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(aten.mul.Tensor, (x, 2.0))
    written = graph.call_function(aten.relu_.default, (a,))  # convertible on its own
    graph.output(graph.call_module("act", (graph.call_function(aten.sub.Tensor, (written, 1.0)),)))
    gm = fx.GraphModule(root, graph)
    assert not functionalize(gm)
    assert aten.relu_.default in [n.target for n in gm.graph.nodes]


def test_runs_keep_values_from_before_an_in_place_op_on_both_paths():
    """A captured value read by a later relu_ must come back as it was before the relu, whether the
    runner converted the graph (no copies) or kept it (copies)."""
    gm, x = _exported()
    node = next(n for n in gm.graph.nodes if n.target is aten.relu_.default).args[0]
    blocked = copy.deepcopy(gm)
    # a late reader of the written tensor: the runner cannot convert this copy and must copy values
    written = next(n for n in blocked.graph.nodes if n.name == node.name)
    with blocked.graph.inserting_before(next(n for n in blocked.graph.nodes if n.op == "output")):
        blocked.graph.call_function(aten.mul.Tensor, (written, 0.0))  # read after the write, unused
    blocked.recompile()
    for module, functional in ((gm, True), (blocked, False)):
        runner = FxRunner(module, (x,))
        values = runner.run({}, capture={node.name})
        assert runner._module is not None and runner._module.schedule.functional is functional
        conv = torch.nn.functional.conv2d(x.double(), gm.conv.weight.double(), gm.conv.bias.double(), padding=1)
        bn = gm.bn
        reference = (conv - bn.running_mean.double().view(1, -1, 1, 1)) / torch.sqrt(
            bn.running_var.double().view(1, -1, 1, 1) + 1e-5
        ) * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1)
        assert (reference < 0).any(), "control: the relu would change this value"
        torch.testing.assert_close(values[node.name], reference, rtol=1e-12, atol=1e-12)
        # a segment's given values are not written into either
        given = {node.name: values[node.name]}
        kept = values[node.name].clone()
        relu = next(n.name for n in module.graph.nodes if n.target in (aten.relu_.default, aten.relu.default))
        runner.run_segment({}, {relu}, [relu], given)
        assert torch.equal(given[node.name], kept)


def test_the_differentiable_copy_shares_weights_only_when_nothing_writes():
    gm, x = _exported()
    weight = gm.conv.weight
    module, _ = FxRunner(gm, (x,)).differentiable()
    assert module.conv.weight.data_ptr() == weight.data_ptr(), "a graph that writes nothing shares the weights"
    assert not module.conv.weight.requires_grad and weight.requires_grad, "the user's parameters keep their flag"
    assert not _writers(module) and _writers(gm)

    traced = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).eval())
    copied, _ = FxRunner(traced, (torch.randn(2, 4),)).differentiable()
    assert copied.get_submodule("0").weight.data_ptr() != traced.get_submodule("0").weight.data_ptr(), (
        "a module call may write: the weights are copied"
    )


def test_an_exported_graph_runs_as_it_is_on_private_copies_of_its_tensors():
    """torch.export's graphs read every tensor through get_attr: the runner runs the source graph
    (no module copy) with its own tensors, in-place ops run as their twins, and the model, even
    one already in float64, is never changed or shared."""
    gm, x = _exported()
    gm, x = gm.double(), x.double()
    targets = [(n.name, n.target) for n in gm.graph.nodes]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    runner = FxRunner(gm, (x,))
    scaled = gm.conv.weight.detach() * 10.0
    (value,) = runner.run({"conv.weight": scaled})[FxRunner.OUTPUT]  # the output node's values

    reference = copy.deepcopy(gm)
    with torch.no_grad():
        reference.conv.weight.copy_(scaled)
        expected = reference(x)
    assert not torch.equal(expected, gm(x)), "control: the override changes the output"
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    assert runner._module is not None and runner._module.gm is gm, "the source graph ran, not a copy"
    assert [(n.name, n.target) for n in gm.graph.nodes] == targets and _writers(gm), "the graph is as it was"
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items()), "the model's tensors are unchanged"
    assert runner._attributes is not None
    source = {t.untyped_storage().data_ptr() for t in gm.state_dict().values()}
    assert not source & {t.untyped_storage().data_ptr() for t in runner._attributes.values()}, "no storage shared"


class _AutocastRegion(nn.Module):
    """torch.export puts the region in a subgraph (wrap_with_autocast), read through get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            y = self.a(x).relu()
        return self.b(y)


def test_a_graph_that_reads_a_subgraph_runs_as_a_converted_copy():
    """A subgraph may hold tensors the top graph's get_attr does not name: the direct path would
    leave them in float32, so such a graph runs as a float64 deep copy, as before."""
    from wssi_audit.frontends.torch_export import unlifted_module

    torch.manual_seed(0)
    model, x = _AutocastRegion().eval(), torch.randn(2, 4)
    gm = unlifted_module(torch.export.export(model, (x,), strict=False))
    read = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "get_attr" and "." not in n.target]
    assert any(isinstance(m, fx.GraphModule) for m in read), "control: the graph reads a subgraph"
    runner = FxRunner(gm, (x,))
    (value,) = runner.run({})[FxRunner.OUTPUT]
    assert runner._attributes is None and runner._module is not None and runner._module.gm is not gm
    assert value.dtype == torch.float64
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
