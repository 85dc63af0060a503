"""window_sizes: the output sizes of convolutions and pooling windows, and what their kernels refuse.

The reference is the CPU kernel that a run would call, on real tensors of the same sizes: on random
geometries (in range and out of it) the rule gives the kernel's output size where the kernel
runs, and refuses where the kernel refuses. torch's meta kernel is the second reference for the
sizes (the one the rules replace).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wssi_audit.frontends.window_sizes import WINDOW_RULES

aten = torch.ops.aten


def _agree(op, rule: str, build, degenerate: bool = False) -> None:
    """The rule on meta tensors against the CPU kernel on real ones (and the meta kernel where both
    run). Where the kernel refuses, so does the rule. `degenerate` arguments (a dilation of 0),
    empty inputs and empty outputs may be refused where some kernel path skips its checks and runs
    (oneDNN's grouped transposed convolution takes a dilation of 0 and returns outputs of size 0
    where torch's own path refuses both)."""
    try:
        out = op(*build(torch.rand))
    except (RuntimeError, ValueError, IndexError):
        with pytest.raises(RuntimeError):
            WINDOW_RULES[rule](build(_meta), {})
        return
    expected = list((out[0] if isinstance(out, tuple) else out).shape)
    if degenerate or build(torch.rand)[0].numel() == 0 or 0 in expected:
        with contextlib.suppress(RuntimeError):
            assert WINDOW_RULES[rule](build(_meta), {}) == expected
        return
    assert WINDOW_RULES[rule](build(_meta), {}) == expected
    meta = op(*build(_meta))
    assert list((meta[0] if isinstance(meta, tuple) else meta).shape) == expected


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


small = st.integers(0, 3)


@settings(max_examples=300, deadline=None)
@given(
    axes=st.integers(1, 3),
    family=st.sampled_from(["conv", "conv_transpose", "convolution"]),
    batch=st.sampled_from([None, 0, 1, 2]),
    groups=st.integers(1, 3),
    per_group=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    channel_error=st.sampled_from([0, 0, 0, 1]),
    size=st.integers(1, 6),
    kernel=st.integers(1, 4),
    stride=st.integers(0, 3),
    padding=st.integers(-1, 3),
    dilation=st.integers(0, 3),
    output_padding=small,
    bias=st.sampled_from(["none", "right", "wrong"]),
    lengths=st.sampled_from(["one", "all", "all", "wrong"]),
)
def test_convolution_rules_agree_with_the_cpu_kernel(
    axes, family, batch, groups, per_group, channel_error, size, kernel, stride, padding, dilation,
    output_padding, bias, lengths,
):  # fmt: skip
    transposed = family == "conv_transpose" or (family == "convolution" and output_padding % 2 == 1)
    if family == "convolution" and batch is None:
        batch = 1
    c_in, c_out = per_group[0] * groups, per_group[1] * groups
    weight = (c_in, per_group[1], *[kernel] * axes) if transposed else (c_out, per_group[0], *[kernel] * axes)
    x = (*([] if batch is None else [batch]), c_in + channel_error, *[size + a for a in range(axes)])
    out_channels = c_out if not transposed else per_group[1] * groups
    bias_shape = {"none": None, "right": (out_channels,), "wrong": (out_channels + 1,)}[bias]

    def values(v: int) -> list[int]:
        return {"one": [v], "all": [v] * axes, "wrong": [v] * (axes + 1)}[lengths]

    def build(t):
        b = None if bias_shape is None else t(*bias_shape)
        if family == "conv":
            return (t(*x), t(*weight), b, values(stride), values(padding), values(dilation), groups)
        if family == "conv_transpose":
            return (
                t(*x),
                t(*weight),
                b,
                values(stride),
                values(padding),
                values(output_padding),
                groups,
                values(dilation),
            )
        extra = values(output_padding if transposed else output_padding - 1)  # unused, but checked
        return (t(*x), t(*weight), b, values(stride), values(padding), values(dilation), transposed, extra, groups)

    op = {
        "conv": getattr(aten, f"conv{axes}d").default,
        "conv_transpose": getattr(aten, f"conv_transpose{axes}d").input if axes > 1 else aten.conv_transpose1d.default,
        "convolution": aten.convolution.default,
    }[family]  # fmt: skip
    rule = {"conv": f"conv{axes}d", "conv_transpose": f"conv_transpose{axes}d", "convolution": "convolution"}[family]
    _agree(op, rule, build, degenerate=dilation < 1)


@settings(max_examples=300, deadline=None)
@given(
    axes=st.integers(1, 3),
    kind=st.sampled_from(["max", "max_with_indices", "avg"]),
    batch=st.sampled_from([None, 0, 1, 2]),
    channels=st.integers(0, 2),
    size=st.integers(0, 7),
    kernel=st.integers(0, 4),
    stride=st.sampled_from([None, 0, 1, 2, 3]),
    padding=st.integers(-1, 3),
    dilation=st.integers(0, 3),
    ceil_mode=st.booleans(),
    lengths=st.sampled_from(["one", "all", "all", "wrong"]),
)
def test_pooling_rules_agree_with_the_cpu_kernel(
    axes, kind, batch, channels, size, kernel, stride, padding, dilation, ceil_mode, lengths
):
    if kind == "max_with_indices" and axes == 1:
        kind = "max"
    x = (*([] if batch is None else [batch]), channels, *[size + a for a in range(axes)])

    def values(v: int) -> list[int]:
        return {"one": [v], "all": [v] * axes, "wrong": [v] * (axes + 1)}[lengths]

    def build(t):
        strides = [] if stride is None else values(stride)
        if kind == "avg":
            return (t(*x), values(kernel), strides, values(padding), ceil_mode)
        return (t(*x), values(kernel), strides, values(padding), values(dilation), ceil_mode)

    name = {"max": f"max_pool{axes}d", "max_with_indices": f"max_pool{axes}d_with_indices", "avg": f"avg_pool{axes}d"}[
        kind
    ]
    _agree(getattr(aten, name).default, name, build, degenerate=kind != "avg" and dilation < 1)


@pytest.mark.parametrize("padding", ["same", "valid", "full"])
@pytest.mark.parametrize("stride", [1, 2])
def test_padding_by_name_agrees_with_the_cpu_kernel(padding, stride):
    _agree(
        aten.conv2d.padding,
        "conv2d",
        lambda t: (t(1, 2, 6, 5), t(3, 2, 3, 2), None, [stride, stride], padding, [2, 1], 1),
    )


def test_keyword_arguments_and_defaults_are_bound_by_the_schema():
    x, w = _meta(1, 2, 9, 9), _meta(4, 2, 3, 3)
    assert WINDOW_RULES["conv2d"]((x, w), {"stride": [2, 2]}) == [1, 4, 4, 4]
    assert WINDOW_RULES["conv2d"]((x, w), {}) == [1, 4, 7, 7]
    assert WINDOW_RULES["max_pool2d"]((x, [3, 3]), {}) == [1, 2, 3, 3]  # an empty stride is the kernel
    assert WINDOW_RULES["avg_pool2d"]((x, [2, 2], [1, 1]), {"divisor_override": 3}) == [1, 2, 8, 8]
    with pytest.raises(RuntimeError):
        WINDOW_RULES["avg_pool2d"]((x, [2, 2]), {"divisor_override": 0})
