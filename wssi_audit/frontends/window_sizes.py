"""Output sizes of convolutions and pooling windows, and the arguments torch's CPU kernels refuse.

recorded_sizes checks every size a program records against the one its operator computes. torch's
meta kernels for these operators call `torch._check`, whose first use imports sympy (through
torch.fx.experimental.symbolic_shapes): 0.27 s of a 4 s ResNet-50 audit, for a division per axis.
These rules compute the same sizes and refuse what the kernels that would run refuse (torch's
meta kernels let some of it pass); tests/test_window_sizes.py checks both against the CPU kernels
on random geometries. They refuse more than some kernel paths in three corners no honest export
reaches: a dilation of 0, an empty input, an output of size 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

Rule = Callable[[Sequence[Any], dict[str, Any]], list[int]]

# Positional order and defaults of each family's schema (aten::conv2d, aten::max_pool2d, ...).
CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_TRANSPOSE = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
MAX_POOL = ("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
AVG_POOL = ("self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
DEFAULTS = {
    "bias": None,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "transposed": False,
    "output_padding": 0,
    "ceil_mode": False,
    "count_include_pad": True,
    "divisor_override": None,
}


def refuse(message: str) -> NoReturn:
    """A size rule's refusal: a RuntimeError, as a kernel's."""
    raise RuntimeError(message)


def _bind(order: Sequence[str], args: Sequence[Any], kwargs: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    return {**DEFAULTS, **defaults, **dict(zip(order, args)), **kwargs}


def _per_axis(named: dict[str, Any], name: str, axes: int, empty_is: str | None = None) -> list[int]:
    """One value per spatial axis from an int, a list of one, or a list of one per axis (an empty
    pooling stride is the kernel size)."""
    value = named[name]
    if isinstance(value, (list, tuple)) and not value and empty_is is not None:
        value = named[empty_is]
    values = [value] if isinstance(value, int) else list(value)
    if len(values) == 1:
        values *= axes
    if len(values) != axes or not all(type(v) is int for v in values):
        refuse(f"{name} {value} for a window over {axes} axes")
    return values


def _convolution(order: Sequence[str], transposed: bool | None, unbatched: bool) -> Rule:
    """Rule for one convolution family: `transposed` None reads it from the arguments; `unbatched`:
    the family also takes an input without its batch axis (conv2d on C x H x W)."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
        named = _bind(order, args, kwargs)
        x, weight, bias, groups = named["input"], named["weight"], named["bias"], named["groups"]
        flipped = bool(named["transposed"]) if transposed is None else transposed
        axes = weight.dim() - 2
        batched = x.dim() == weight.dim()
        if axes < 1 or not (batched or (unbatched and x.dim() == weight.dim() - 1)):
            refuse(f"an input of {tuple(x.shape)} for a weight of {tuple(weight.shape)}")
        if type(groups) is not int or groups < 1:
            refuse(f"groups {groups}")
        stride, dilation = _per_axis(named, "stride", axes), _per_axis(named, "dilation", axes)
        channels, spatial = x.shape[-axes - 1], list(x.shape[-axes:])
        kernel = list(weight.shape[2:])
        if min(stride) < 1 or min(dilation) < 1:
            refuse(f"stride {stride} and dilation {dilation} must be positive")
        if weight.shape[0] < groups or weight.shape[0] % groups:
            refuse(f"a weight of {tuple(weight.shape)} for {groups} groups")
        out_channels = weight.shape[1] * groups if flipped else weight.shape[0]
        expected_channels = weight.shape[0] if flipped else weight.shape[1] * groups
        if channels != expected_channels:
            refuse(f"an input of {tuple(x.shape)} with {channels} channels for a weight of {tuple(weight.shape)}")
        if isinstance(bias, torch.Tensor) and (bias.dim() != 1 or bias.shape[0] != out_channels):
            refuse(f"a bias of {tuple(bias.shape)} for {out_channels} output channels")
        extra = _per_axis(named, "output_padding", axes)  # checked where unused, too (torch does)
        if min(extra) < 0:
            refuse(f"negative output padding {extra}")
        if isinstance(named["padding"], str):
            sizes = _padded_by_name(named["padding"], spatial, kernel, stride, dilation)
        elif flipped:
            sizes = _transposed_sizes(_per_axis(named, "padding", axes), extra, spatial, kernel, stride, dilation)
        else:
            sizes = _direct_sizes(_per_axis(named, "padding", axes), spatial, kernel, stride, dilation)
        return [*([x.shape[0]] if batched else []), out_channels, *sizes]

    return rule


def _direct_sizes(
    padding: list[int], spatial: list[int], kernel: list[int], stride: list[int], dilation: list[int]
) -> list[int]:
    if min(padding) < 0:
        refuse(f"negative padding {padding}")
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    padded = [n + 2 * p for n, p in zip(spatial, padding)]
    if any(n < span for n, span in zip(padded, spans)):
        refuse(f"a kernel of {spans} (dilated) is larger than the padded input {padded}")
    return [(n - span) // s + 1 for n, span, s in zip(padded, spans, stride)]


def _padded_by_name(
    padding: str, spatial: list[int], kernel: list[int], stride: list[int], dilation: list[int]
) -> list[int]:
    """padding='valid' (none) or 'same' (the input's sizes, unstrided only)."""
    if padding == "valid":
        return _direct_sizes([0] * len(spatial), spatial, kernel, stride, dilation)
    if padding == "same" and max(stride) == 1:
        return spatial
    refuse(f"padding {padding!r} with stride {stride}")


def _transposed_sizes(
    padding: list[int], extra: list[int], spatial: list[int], kernel: list[int], stride: list[int], dilation: list[int]
) -> list[int]:
    if min(padding) < 0:
        refuse(f"negative padding {padding}")
    if any(e >= s and e >= d for e, s, d in zip(extra, stride, dilation)):
        refuse(f"output padding {extra} must be smaller than the stride {stride} or the dilation {dilation}")
    sizes = [
        (n - 1) * s - 2 * p + d * (k - 1) + e + 1
        for n, s, p, d, k, e in zip(spatial, stride, padding, dilation, kernel, extra)
    ]
    if min(sizes) < 1:
        refuse(f"output size {sizes} is too small")
    return sizes


def _pool(order: Sequence[str], axes: int, dilated: bool, unpadded: bool = False) -> Rule:
    """Rule for max pooling (`dilated`) or average pooling over `axes` spatial axes; `unpadded`:
    the kernel must also fit the input without its padding (avg_pool3d's check)."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> list[int]:
        named = _bind(order, args, kwargs, stride=[])  # a pooling window's stride is its size by default
        x = named["self"]
        kernel = _per_axis(named, "kernel_size", axes)
        stride = _per_axis(named, "stride", axes, empty_is="kernel_size")
        padding = _per_axis(named, "padding", axes)
        dilation = _per_axis(named, "dilation", axes) if dilated else [1] * axes
        if x.dim() not in (axes + 1, axes + 2) or 0 in x.shape[x.dim() - axes - 1 :]:
            refuse(f"an input of {tuple(x.shape)} for a window over {axes} axes")
        if min(kernel) < 1 or min(stride) < 1 or min(dilation) < 1:
            refuse(f"kernel {kernel}, stride {stride} and dilation {dilation} must be positive")
        if any(p < 0 or p > k // 2 for p, k in zip(padding, kernel)):
            refuse(f"padding {padding} must be at most half the kernel {kernel}")
        if unpadded and any(n < k for n, k in zip(x.shape[-axes:], kernel)):
            refuse(f"an input of {tuple(x.shape)} smaller than the kernel {kernel}")
        if named.get("divisor_override") == 0:
            refuse("divisor_override 0")
        ceil = bool(named["ceil_mode"])
        sizes = [
            _pooled(n, k, s, p, d, ceil) for n, k, s, p, d in zip(x.shape[-axes:], kernel, stride, padding, dilation)
        ]
        if min(sizes) < 1:
            refuse(f"output size {sizes} is too small for an input of {tuple(x.shape)}")
        return [*x.shape[: x.dim() - axes], *sizes]

    return rule


def _pooled(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
    """torch's pooling_output_shape: windows that start inside the input or its left padding."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


WINDOW_RULES: dict[str, Rule] = {
    **{f"conv{n}d": _convolution(CONV, False, True) for n in (1, 2, 3)},
    **{f"conv_transpose{n}d": _convolution(CONV_TRANSPOSE, True, True) for n in (1, 2, 3)},
    "convolution": _convolution(CONVOLUTION, None, False),
    "_convolution": _convolution(CONVOLUTION, None, False),
    **{f"max_pool{n}d": _pool(MAX_POOL, n, True) for n in (1, 2, 3)},
    **{f"max_pool{n}d_with_indices": _pool(MAX_POOL, n, True) for n in (2, 3)},
    **{f"avg_pool{n}d": _pool(AVG_POOL, n, False, unpadded=n == 3) for n in (1, 2, 3)},
}
