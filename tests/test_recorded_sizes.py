"""recorded_sizes: the sizes a torch.export program records are the ones its operators compute.

The size rules stand in for torch's meta kernels where those import torch._dynamo; each is checked
here against torch's own meta kernel (the independent reference) on random sizes. Honest programs
of every kind the reader builds pass through both loaders; an edited record, a weight stored with
other strides, and a run larger than the memory budget are refused.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from test_attacks import edit_json, read_members, write_members
from test_pt2_reader import Autocast as AutocastModel
from test_pt2_reader import _models, _read, _save
from wssi_audit.errors import InputError
from wssi_audit.frontends.recorded_sizes import SIZE_RULES, _broadcast, _writes_first_argument, check_recorded_sizes
from wssi_audit.frontends.torch_export import example_inputs_of
from wssi_audit.pt2_reader import Unsupported

aten = torch.ops.aten
sizes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def torch_shape(op, *args, **kwargs) -> list[int]:
    out = op(*args, **kwargs)
    return list((out[0] if isinstance(out, tuple) else out).shape)


@settings(max_examples=40, deadline=None)
@given(shape=sizes, drop=st.lists(st.booleans(), min_size=4, max_size=4), lead=st.integers(0, 2))
def test_broadcast_rule_agrees_with_torch(shape, drop, lead):
    other = [1 if d else n for n, d in zip(shape, drop)][: len(shape)]
    a, b = meta(*([2] * lead + shape)), meta(*other)
    assert _broadcast((a, b), {}) == torch_shape(aten.add.Tensor, a, b)
    assert _broadcast((a > 0, a, b), {}) == torch_shape(aten.where.self, a > 0, a, b)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4), dim=st.integers(-4, 3), extra=st.integers(1, 3))
def test_cat_rule_agrees_with_torch(shape, dim, extra):
    dim = dim % len(shape)
    other = list(shape)
    other[dim] = extra
    operands = [meta(*shape), meta(*other), torch.empty(0, device="meta")]
    assert SIZE_RULES["cat"]((operands, dim), {}) == torch_shape(aten.cat.default, operands, dim)
    wrong = list(shape)
    wrong[(dim + 1) % len(shape)] += 1
    if len(shape) > 1:  # a mismatched size off the concatenated axis: both refuse
        with pytest.raises(RuntimeError):
            SIZE_RULES["cat"](([meta(*shape), meta(*wrong)], dim), {})
        with pytest.raises(RuntimeError):
            aten.cat.default([meta(*shape), meta(*wrong)], dim)


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 4), max_size=3), features=st.integers(1, 6), out=st.integers(1, 6))
def test_linear_rule_agrees_with_torch(lead, features, out):
    x, w = meta(*lead, features), meta(out, features)
    assert SIZE_RULES["linear"]((x, w, None), {}) == torch_shape(aten.linear.default, x, w)
    with pytest.raises(RuntimeError):
        SIZE_RULES["linear"]((meta(*lead, features + 1), w), {})
    with pytest.raises(RuntimeError):
        aten.linear.default(meta(*lead, features + 1), w)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_reduction_rules_agree_with_torch(shape, data):
    rank = len(shape)
    dims = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda d: d % rank))
    keep = data.draw(st.booleans())
    x = meta(*shape)
    for name, op in (("mean", aten.mean.dim), ("sum", aten.sum.dim_IntList), ("amax", aten.amax.default)):
        assert SIZE_RULES[name]((x, dims, keep), {}) == torch_shape(op, x, dims, keep), name


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       out=st.tuples(st.integers(1, 4), st.integers(1, 4)))  # fmt: skip
def test_pool_norm_and_roll_rules_agree_with_torch(n, c, h, w, out):
    x = meta(n, c, h, w)
    assert SIZE_RULES["adaptive_avg_pool2d"]((x, list(out)), {}) == torch_shape(
        aten.adaptive_avg_pool2d.default, x, out
    )
    assert SIZE_RULES["batch_norm"]((x,), {}) == torch_shape(
        aten.batch_norm.default, x, meta(c), meta(c), meta(c), meta(c), False, 0.1, 1e-5, True
    )
    assert SIZE_RULES["layer_norm"]((x, [w]), {}) == torch_shape(aten.layer_norm.default, x, [w])
    assert SIZE_RULES["group_norm"]((x, 1), {}) == torch_shape(aten.group_norm.default, x, 1)
    assert SIZE_RULES["roll"]((x, [1], [2]), {}) == torch_shape(aten.roll.default, x, [1], [2])


@settings(max_examples=30, deadline=None)
@given(batch=st.lists(st.integers(1, 3), max_size=2), q=st.integers(1, 5), k=st.integers(1, 5),
       e=st.integers(1, 6), v=st.integers(1, 6))  # fmt: skip
def test_attention_rule_agrees_with_torch(batch, q, k, e, v):
    query, key, value = meta(*batch, q, e), meta(*batch, k, e), meta(*batch, k, v)
    args = (query, key, value)
    assert SIZE_RULES["scaled_dot_product_attention"](args, {}) == torch_shape(
        aten.scaled_dot_product_attention.default, *args
    )


def test_in_place_operators_are_their_input_and_others_are_not():
    for op in (aten.relu_.default, aten.add_.Tensor, aten.hardswish_.default):
        assert _writes_first_argument(op), op
    for op in (aten.relu.default, aten.add.Tensor, aten.view.default, aten.transpose.int):
        assert not _writes_first_argument(op), op


def _autocast() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return AutocastModel(), torch.randn(2, 4)


@pytest.mark.parametrize("name", ["cnn", "resnet_bn", "transformer_block", "odd", "mutation", "autocast"])
def test_honest_programs_pass_through_either_loader(tmp_path, name):
    model, x = _autocast() if name == "autocast" else _models()[name]
    path = _save(model, x, tmp_path / f"{name}.pt2")
    programs = [torch.export.load(str(path))]
    with contextlib.suppress(Unsupported):  # the reader leaves some programs (autocast) to torch
        programs.append(_read(path))
    for program in programs:
        check_recorded_sizes(program, example_inputs_of(program))


def test_memory_budget_counts_each_new_float64_value_once():
    """Input 2x4, linear 2x3, relu 2x3 (a view and an in-place op hold nothing new): 20 values of
    8 bytes. Refused with a budget of 2 x 159 bytes (half is the limit), passed with 2 x 160."""

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).relu().view(6).relu_()

    x = torch.randn(2, 4)
    program = torch.export.export(Small(), (x,))
    assert {str(n.target) for n in program.graph.nodes} >= {"aten.view.default", "aten.relu_.default"}
    check_recorded_sizes(program, (x,), memory=2 * 160)
    with pytest.raises(
        InputError, match="holds 160 B of float64 values, more than 50% of this machine's 318 B of memory"
    ):
        check_recorded_sizes(program, (x,), memory=2 * 159)


def _edited_size(tmp_path: Path) -> Path:
    """The conv's output recorded as 3x3 where the operator computes 8x8 (padding 1)."""
    from conftest import example_model

    model, x = example_model("cnn")
    honest = _save(model, x, tmp_path / "honest.pt2")

    def shrink(document):
        values = document["graph_module"]["graph"]["tensor_values"]
        values["conv2d"]["sizes"][-2:] = [{"as_int": 3}, {"as_int": 3}]

    return write_members(tmp_path / "edited.pt2", edit_json(read_members(honest), "models/model.json", shrink))


def test_an_edited_record_is_refused_and_torch_loads_it_silently(tmp_path):
    path = _edited_size(tmp_path)
    program = torch.export.load(str(path))  # control: torch's loader and verifier accept it
    conv = next(n for n in program.graph.nodes if n.name == "conv2d")
    assert list(conv.meta["val"].shape[-2:]) == [3, 3]
    with pytest.raises(InputError, match=r"value conv2d \(aten.conv2d.default\) is recorded as .*3, 3.*computes"):
        check_recorded_sizes(program, example_inputs_of(program))


def test_the_recorded_values_of_an_honest_program_are_unchanged(tmp_path):
    """The check only reads: node values, weights and sample inputs are what they were."""
    model, x = _models()["odd"]
    path = _save(model, x, tmp_path / "odd.pt2")
    program = _read(path)
    before = json.dumps([str(n.meta.get("val")) for n in program.graph.nodes])
    weights = {k: v.clone() for k, v in program.state_dict.items()}
    check_recorded_sizes(program, example_inputs_of(program))
    assert json.dumps([str(n.meta.get("val")) for n in program.graph.nodes]) == before
    assert all(torch.equal(weights[k], v) for k, v in program.state_dict.items())


def test_a_value_that_could_not_be_computed_is_not_compared():
    """An operator without a meta kernel on a symbolic size keeps its record: None, not a mismatch."""
    from wssi_audit.frontends.recorded_sizes import _same_sizes

    a, b = meta(2, 3), meta(4)
    assert _same_sizes(None, a) and _same_sizes((a, None), (a, b)) and _same_sizes((a, b), (a, b))
    assert not _same_sizes((a, meta(5)), (a, b)) and not _same_sizes(meta(3, 2), a) and not _same_sizes((a,), (a, b))


def _cpu(*shape: int) -> torch.Tensor:
    return torch.rand(shape)


# (operator, rule, arguments) for sizes torch's CPU kernels refuse (or accept): its meta kernels
# accept some of the refused ones, so the reference is the kernel that would run.
AGREEMENT_CASES = [
    (aten.layer_norm.default, "layer_norm", lambda t: (t(2, 3, 8), [8])),
    (aten.layer_norm.default, "layer_norm", lambda t: (t(2, 3, 8), [9])),
    (aten.layer_norm.default, "layer_norm", lambda t: (t(2, 3, 8), [3, 8])),
    (aten.layer_norm.default, "layer_norm", lambda t: (t(2, 3, 8), [2, 3, 8, 1])),
    (aten.layer_norm.default, "layer_norm", lambda t: (t(2, 3, 8), [8], t(7))),
    (aten.batch_norm.default, "batch_norm", lambda t: (t(2, 4, 3), t(4), t(4), t(4), t(4), False, 0.1, 1e-5, True)),
    (aten.batch_norm.default, "batch_norm", lambda t: (t(2, 4, 3), t(4), t(4), t(5), t(4), False, 0.1, 1e-5, True)),
    (aten.batch_norm.default, "batch_norm", lambda t: (t(2, 4, 3), t(3), t(4), t(4), t(4), False, 0.1, 1e-5, True)),
    (aten.group_norm.default, "group_norm", lambda t: (t(2, 6, 3), 3)),
    (aten.group_norm.default, "group_norm", lambda t: (t(2, 6, 3), 4)),
    (aten.group_norm.default, "group_norm", lambda t: (t(2, 6, 3), 3, t(5))),
    (aten.roll.default, "roll", lambda t: (t(2, 3), [1], [1])),
    (aten.roll.default, "roll", lambda t: (t(2, 3), [1, 2], [1])),
    (aten.roll.default, "roll", lambda t: (t(2, 3), [1], [5])),
    (aten.roll.default, "roll", lambda t: (t(2, 3), [1, 2], [])),
    (aten.mean.dim, "mean", lambda t: (t(2, 3), [1, 1])),
    (aten.mean.dim, "mean", lambda t: (t(2, 3), [1, -1])),
    (aten.mean.dim, "mean", lambda t: (t(2, 3), [0, 1], True)),
    (aten.adaptive_avg_pool2d.default, "adaptive_avg_pool2d", lambda t: (t(1, 2, 5, 5), [2, 2])),
    (aten.adaptive_avg_pool2d.default, "adaptive_avg_pool2d", lambda t: (t(1, 2, 5, 5), [2, 2, 2])),
    (aten.adaptive_avg_pool2d.default, "adaptive_avg_pool2d", lambda t: (t(5, 5), [2, 2])),
    (aten.adaptive_avg_pool2d.default, "adaptive_avg_pool2d", lambda t: (t(1, 2, 0, 5), [2, 2])),
    (aten.linear.default, "linear", lambda t: (t(2, 3), t(4, 3), t(4))),
    (aten.linear.default, "linear", lambda t: (t(2, 3), t(4, 3), t(5))),
    (aten.linear.default, "linear", lambda t: (t(2, 3), t(4, 2))),
    (aten.cat.default, "cat", lambda t: ([t(2, 3), t(2, 4)], 1)),
    (aten.cat.default, "cat", lambda t: ([t(2, 3), t(3, 4)], 1)),
    (aten.cat.default, "cat", lambda t: ([t(2, 3), t(2, 3)], 2)),
    (aten.softmax.int, "softmax", lambda t: (t(2, 3), -1)),
    (aten.softmax.int, "softmax", lambda t: (t(2, 3), 7)),
    (aten._log_softmax.default, "_log_softmax", lambda t: (t(2, 3), -3, False)),
]


@pytest.mark.parametrize("op, rule, build", AGREEMENT_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(AGREEMENT_CASES)])
def test_rules_refuse_what_torchs_kernels_refuse(op, rule, build):
    """Found by a sweep of node arguments: a normalized shape that does not end the input's passed
    the check and failed only in the run; now the rule refuses it at load, as the kernel would."""
    try:
        expected = list(op(*build(_cpu)).shape)
    except (RuntimeError, ValueError, IndexError):
        with pytest.raises(RuntimeError):
            SIZE_RULES[rule](build(meta), {})
        return
    assert SIZE_RULES[rule](build(meta), {}) == expected


@pytest.mark.parametrize("name", ["stride", "padding", "dilation"])
def test_a_convolution_argument_of_the_wrong_length_is_refused_as_torchs_kernel_refuses_it(name):
    """torch's meta kernel lets stride [1, 1, 1] pass a 2-d convolution; its CPU kernel does not
    (found by a sweep of node arguments: the run failed and every chain was 'not run')."""
    from wssi_audit.frontends.recorded_sizes import _check_window_arguments

    def call(t):
        arguments = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]} | {name: [1, 1, 1]}
        return (t(1, 2, 5, 5), t(3, 2, 3, 3), None, arguments["stride"], arguments["padding"], arguments["dilation"], 1)

    assert aten.conv2d.default(*call(meta)).dim() == 4  # meta: passes
    with pytest.raises(RuntimeError):
        aten.conv2d.default(*call(_cpu))
    with pytest.raises(RuntimeError, match=name):
        _check_window_arguments(aten.conv2d.default, call(meta), {})
    _check_window_arguments(aten.conv2d.default, (meta(1, 2, 5, 5), meta(3, 2, 3, 3), None, [1], [0], [1], 1), {})
