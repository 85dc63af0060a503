"""Which input position each output and kernel tap of a convolution reads, one spatial axis at a time.

A convolution's geometry is separable: along one axis, output j and tap t read input position
s*j + offset_t (offset_t = dilation*t - pad_before), and the padding mode says what a position
outside [0, size) stands for (zero, a reflected, clamped or wrapped input). A transposed
convolution is the adjoint of the convolution from its output size back to its input size with
the same weight tensor, so it has the same singular values: `conv_axes(transposed=True)` returns
that convolution's axes. Taps that never read an input and outputs that read only zero padding
are dropped here: they change no singular value, and they make the bounds looser and slower.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Reads (outputs x taps) one axis may have: its tables are built in Python, and a crafted padding
# of 2^31 would loop for hours. Real layers stay far below (ResNet's first conv: 112 x 7).
MAX_AXIS_READS = 2**24


def _reflect(i: int, n: int) -> int:
    """torch's 'reflect' padding (no edge repeat), for any distance from the edge."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return i if i < n else period - i


_SOURCE = {
    "zeros": lambda i, n: i if 0 <= i < n else None,
    "reflect": _reflect,
    "replicate": lambda i, n: min(max(i, 0), n - 1),
    "circular": lambda i, n: i % n,
}


@dataclass(frozen=True)
class Axis:
    """One spatial axis: output j, kept tap number t reads input s*j + offsets[t] (then padded)."""

    size: int  # input length
    outputs: int  # output length
    stride: int
    offsets: tuple[int, ...]  # per kept tap: dilation * tap - pad_before
    taps: tuple[int, ...]  # the kernel indices of the kept taps
    mode: str = "zeros"

    def source(self, j: int, t: int) -> int | None:
        """The input position output j reads through kept tap t, or None for zero padding."""
        return _SOURCE[self.mode](self.stride * j + self.offsets[t], self.size)

    def tap_matrices(self) -> torch.Tensor:
        """(taps, outputs, size): B_t[j, i] = how often output j reads input i through tap t."""
        matrices = torch.zeros(len(self.taps), self.outputs, self.size, dtype=torch.float64)
        pairs = itertools.product(range(len(self.taps)), range(self.outputs))
        reads = [(t, j, i) for t, j in pairs if (i := self.source(j, t)) is not None]
        if reads:  # one scatter, not a tensor write per read (224-long axes have hundreds)
            index = torch.tensor(reads).T
            matrices.index_put_(tuple(index), torch.ones(len(reads), dtype=torch.float64), accumulate=True)
        return matrices

    def circulant_period(self) -> int | None:
        """Smallest N, a multiple of the stride, for which this axis is rows and columns of a
        stride-s circular convolution of length N (None when the padding mode allows none).

        Zero padding: put the input at positions [0, size) of a length-N ring, zeros elsewhere.
        Output j reads ring position (s*j + offset) mod N; that is the input position when it
        lies in [0, size), and a ring zero otherwise, if N >= size + max(0, -min offset) and
        N > s*(outputs - 1) + max offset. Distinct outputs are distinct ring outputs if
        outputs <= N / s. Circular padding with s | size is that ring with N = size exactly.
        """
        s = self.stride
        if self.mode == "zeros":
            needed = max(
                self.size + max(0, -min(self.offsets)), s * (self.outputs - 1) + max(self.offsets) + 1, s * self.outputs
            )
            return s * math.ceil(needed / s)
        if self.mode == "circular" and self.size % s == 0 and self.outputs <= self.size // s:
            return self.size
        return None

    def phases(self) -> list[tuple[int, int]]:
        """Per kept tap (q, phi) with offset = s*q + phi, 0 <= phi < s: the polyphase form, in
        which a stride-s convolution is a stride-1 convolution of the s input phases."""
        return [divmod(offset, self.stride) for offset in self.offsets]

    def padded(self) -> tuple[Axis, float]:
        """This axis as a convolution without padding of the padded input, and the norm of the
        padding map (input -> padded input): sqrt(most copies of one input position)."""
        low = -min(0, min(self.offsets))
        high = max(0, self.stride * (self.outputs - 1) + max(self.offsets) + 1 - self.size)
        copies = [0] * self.size
        for i in range(-low, self.size + high):
            source = _SOURCE[self.mode](i, self.size)
            if source is not None:
                copies[source] += 1
        axis = Axis(self.size + low + high, self.outputs, self.stride, tuple(o + low for o in self.offsets), self.taps)
        return axis, math.sqrt(max(copies))


def per_axis(value: Any, dims: int, name: str) -> list[int]:
    """One int per spatial axis from an int or a list (a 1-list is broadcast)."""
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * dims
    if len(values) == 1:
        values = values * dims
    if len(values) != dims:
        raise InputError(f"{name} {value!r} does not have one value per spatial axis ({dims})")
    return values


def axis_pads(padding: Any, kernel: Sequence[int], dilation: Sequence[int], dims: int) -> list[tuple[int, int]]:
    """(before, after) per axis from an int, one value per axis, ONNX's begins+ends, or a string."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * dims
        if padding == "same":  # torch's rule: the odd pixel goes after
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return [(total // 2, total - total // 2) for total in totals]
        raise InputError(f"padding {padding!r} is not an int, a list or 'same'/'valid'")
    values = [int(v) for v in padding] if isinstance(padding, (list, tuple)) else [int(padding)]
    if len(values) == 2 * dims and dims > 1:
        pads = list(zip(values[:dims], values[dims:]))
    else:
        pads = [(p, p) for p in per_axis(values, dims, "padding")]
    if any(p < 0 for pair in pads for p in pair):
        raise InputError(f"negative padding {padding!r} is not supported")
    return pads


def _axis(size: int, outputs: int, kernel: int, stride: int, dilation: int, before: int, mode: str) -> Axis:
    """The axis with dead taps (never read an input) and dead outputs (read only zeros) dropped."""
    offsets = [dilation * t - before for t in range(kernel)]
    if mode != "zeros":
        return Axis(size, outputs, stride, tuple(offsets), tuple(range(kernel)), mode)
    live_outputs = [j for j in range(outputs) if any(0 <= stride * j + o < size for o in offsets)]
    if not live_outputs:
        return Axis(size, 0, stride, (), (), mode)
    first, last = live_outputs[0], live_outputs[-1]
    shifted = [o + stride * first for o in offsets]
    count = last - first + 1
    taps = [t for t, o in enumerate(shifted) if any(0 <= stride * j + o < size for j in range(count))]
    return Axis(size, count, stride, tuple(shifted[t] for t in taps), tuple(taps), mode)


def conv_axes(
    kernel_size: Sequence[int],
    input_size: Sequence[int],
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    *,
    transposed: bool = False,
    output_padding: Any = 0,
    padding_mode: str = "zeros",
) -> tuple[Axis, ...]:
    """The axes of the convolution at `input_size` (spatial sizes only, no batch or channel).

    For a transposed convolution, the axes of the convolution it is the adjoint of: it reads the
    transposed output (size (n-1)s - pads + d(k-1) + output_padding + 1) and writes n outputs.
    """
    dims = len(kernel_size)
    if len(input_size) != dims:
        raise InputError(f"input size {tuple(input_size)} does not match a {dims}-d kernel")
    if padding_mode not in PADDING_MODES:
        raise InputError(f"padding mode {padding_mode!r} is not one of {', '.join(PADDING_MODES)}")
    if transposed and padding_mode != "zeros":
        raise InputError("a transposed convolution supports only zero padding")
    strides = per_axis(stride, dims, "stride")
    dilations = per_axis(dilation, dims, "dilation")
    pads = axis_pads(padding, kernel_size, dilations, dims)
    extra = per_axis(output_padding, dims, "output_padding")
    axes = []
    for n, k, s, d, (before, after), o in zip(input_size, kernel_size, strides, dilations, pads, extra):
        if n < 1 or k < 1 or s < 1 or d < 1:
            raise InputError(f"sizes, kernel, stride and dilation must be positive (size {n}, kernel {k})")
        if max(n, (n + before + after) // s) * k > MAX_AXIS_READS:
            raise InputError(f"an axis of {n} positions (padding {before}, {after}, kernel {k}) is too long to bound")
        if transposed:
            full = (n - 1) * s - before - after + d * (k - 1) + o + 1
            if full < 1:
                raise InputError(f"the transposed convolution has no output along an axis of size {n}")
            axes.append(_axis(full, n, k, s, d, before, "zeros"))
            continue
        if padding_mode in ("reflect", "circular") and max(before, after) > n - (padding_mode == "reflect"):
            raise InputError(f"{padding_mode} padding {max(before, after)} is too large for size {n}")
        outputs = (n + before + after - d * (k - 1) - 1) // s + 1
        if outputs < 1:
            raise InputError(f"the kernel ({k}, dilation {d}) is larger than the padded input ({n})")
        axes.append(_axis(n, outputs, k, s, d, before, padding_mode))
    return tuple(axes)
