"""The exact l2 Lipschitz constants of pooling layers at their traced input size.

Pooling windows are products of per-axis intervals, so everything is separable:
- max pooling is piecewise a selection: each output copies one input of its window. A Jacobian
  J has one 1 per row, J^T J is diagonal with how often each input is selected, so
  ||J|| = sqrt(max selections) <= sqrt(max windows covering one input); all windows covering a
  position select it when that input is large, so the Lipschitz constant is exactly
  sqrt(prod over axes of the most windows covering one position of that axis);
- average pooling is linear, A = kron over axes of A_axis (A_axis[j, i] = 1/divisor for i in
  window j; torch's divisors are per-axis products too), so ||A|| = prod ||A_axis||_2, each a
  small matrix whose norm linear_operator_norm proves.
At large sizes these equal today's sqrt(prod ceil(k/s)) for max pooling and are below it for
average pooling; at small sizes (a window larger than the input, few outputs) they are smaller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError
from .conv_geometry import per_axis
from .operator_norms import NormBound, linear_operator_norm

POOL_KINDS = ("max", "avg", "adaptive_max", "adaptive_avg")
# Entries of one axis's dense averaging matrix (float64: 512 MiB); a longer axis gets no exact constant.
MAX_MATRIX_ENTRIES = 2**26


def _per_axis(value: Any, dims: int) -> list[int]:
    return per_axis(value, dims, "pooling parameter")


def _windows(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> list[tuple[int, int, int]]:
    """Per output (first read position, one past the last, step) in input coordinates, as torch
    defines the output size (a ceil-mode window must start inside the input or left padding)."""
    span = d * (k - 1) + 1
    if n + 2 * p < span:
        raise InputError(f"the pooling window ({k}, dilation {d}) is larger than the padded input ({n})")
    numerator = n + 2 * p - span + (s - 1 if ceil_mode else 0)
    outputs = numerator // s + 1
    if ceil_mode and (outputs - 1) * s >= n + p:
        outputs -= 1
    return [(j * s - p, j * s - p + span, d) for j in range(outputs)]


def _adaptive_windows(n: int, m: int) -> list[tuple[int, int, int]]:
    return [((j * n) // m, -((-(j + 1) * n) // m), 1) for j in range(m)]


def _max_coverage(n: int, windows: list[tuple[int, int, int]]) -> int:
    cover = [0] * n
    for start, stop, step in windows:
        for i in range(start, stop, step):
            if 0 <= i < n:
                cover[i] += 1
    return max(cover)


def _average_matrix(n: int, windows: list[tuple[int, int, int]], divisors: list[float]) -> torch.Tensor:
    matrix = torch.zeros(len(windows), n, dtype=torch.float64)
    for j, ((start, stop, step), divisor) in enumerate(zip(windows, divisors)):
        for i in range(start, stop, step):
            if 0 <= i < n:
                matrix[j, i] = 1.0 / divisor
    return matrix


def pool_lipschitz(
    kind: str,
    input_size: Sequence[int],
    kernel_size: Any = None,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    output_size: Any = None,
) -> NormBound:
    """Lipschitz constant (l2) of max/avg pooling (or their adaptive forms, with output_size)
    on one channel at the spatial input size; pooling acts per channel, so this is the layer's."""
    if kind not in POOL_KINDS:
        raise InputError(f"pooling kind {kind!r} is not one of {', '.join(POOL_KINDS)}")
    dims = len(input_size)
    sizes = [int(n) for n in input_size]
    if kind.startswith("adaptive"):
        if output_size is None:
            raise InputError("adaptive pooling needs its output size")
        targets = [n if m is None else int(m) for n, m in zip(sizes, _per_axis_or_none(output_size, dims))]
        windows = [_adaptive_windows(n, m) for n, m in zip(sizes, targets)]
        full = [[float(stop - start) for start, stop, _ in axis] for axis in windows]
        divisors = full
    else:
        if kernel_size is None:
            raise InputError("pooling needs its kernel size")
        kernels = _per_axis(kernel_size, dims)
        strides = _per_axis(stride if stride not in (None, [], ()) else kernel_size, dims)
        pads = _per_axis(padding, dims)
        dilations = _per_axis(dilation, dims)
        windows = [_windows(*a, ceil_mode) for a in zip(sizes, kernels, strides, pads, dilations)]
        divisors = []
        for n, p, axis in zip(sizes, pads, windows):
            if count_include_pad:  # torch clips the window to the padded input
                divisors.append([float(min(stop, n + p) - max(start, -p)) for start, stop, _ in axis])
            else:
                divisors.append([float(min(stop, n) - max(start, 0)) for start, stop, _ in axis])
    if kind.endswith("max"):
        coverage = math.prod(_max_coverage(n, axis) for n, axis in zip(sizes, windows))
        value = math.sqrt(coverage)
        return NormBound(value, value, "max-pool coverage")
    if divisor_override:
        divisors = [[1.0] * len(axis) for axis in windows]
    if any(len(axis) * n > MAX_MATRIX_ENTRIES for n, axis in zip(sizes, windows)):
        raise InputError(f"an average pool over sizes {sizes} is too long for its dense per-axis matrices")
    upper, lower = 1.0, 1.0
    for n, axis, divisor in zip(sizes, windows, divisors):
        bound = linear_operator_norm(_average_matrix(n, axis, divisor))
        assert bound.lower is not None  # a matrix's lower value is its Ritz value: always there
        upper, lower = upper * bound.upper, lower * bound.lower
    if divisor_override:
        upper, lower = upper / divisor_override, lower / divisor_override
    return NormBound(upper, lower, "average-pool matrices")


def _per_axis_or_none(value: Any, dims: int) -> list[int | None]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * dims
    values = values * dims if len(values) == 1 else values
    if len(values) != dims:
        raise InputError(f"output size {value!r} does not have one value per axis ({dims})")
    return [None if v is None else int(v) for v in values]
