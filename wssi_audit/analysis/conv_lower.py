"""A lower estimate of a convolution's operator norm: ||A z|| / ||z|| for an explicit input z.

Axes kept exact carry any vector; along the other axes z is a plane wave at a chosen frequency
under a flat or a sine window (the shape of a Toeplitz matrix's top singular vectors). Then
A z = K u for a small operator K = sum_t V_t (x) kron_axes G_axis[t] acting on the free part u
(channels, exact positions, input phases): G is the tap's 0/1 read matrix on an exact axis, and
the wave as each output reads it on a windowed axis. The best u is the top right singular
vector of K N^(-1/2) (N: the squared norms of the waves), which a block Krylov method reaches
through products with K and K^H, never forming them. On the output side the same is done for
A^T and a windowed output.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .conv_geometry import Axis
from .psd_bound import block_krylov

# Longest window along one axis: a wave this long is within a few percent of the best one on
# longer axes, and the estimate's cost grows with the window's length.
WINDOW = 24


def _windows(count: int) -> torch.Tensor:
    """(2, count): a flat and a sine window over the middle min(count, WINDOW) positions, 0 elsewhere."""
    length = min(count, WINDOW)
    first = (count - length) // 2
    position = torch.arange(length, dtype=torch.float64)
    windows = torch.zeros(2, count, dtype=torch.float64)
    windows[0, first : first + length] = 1.0
    windows[1, first : first + length] = torch.sin(math.pi * (position + 1) / (length + 1))
    return windows


def _sources(axis: Axis) -> torch.Tensor:
    """(taps, outputs): the input position each output reads through each tap, -1 for a zero."""
    rows = [[axis.source(j, t) for j in range(axis.outputs)] for t in range(len(axis.taps))]
    return torch.tensor([[-1 if i is None else i for i in row] for row in rows], dtype=torch.long)


def window_matrices(axis: Axis, omega: float, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """((2, taps, rows, cols), (2, cols)) for a flat and a sine window: how each output (input
    side) or input (output side) of this axis sees the windowed plane wave, and the wave's
    squared norm per free coordinate.

    Input side, phases phi of the stride s: z_phi(i) = [i = phi mod s] w(i) exp(i omega floor(i/s));
    G[t, j, phi] = z_phi(src(j, t)) (rows: outputs, cols: phases).
    Output side: y(j) = w(j) exp(i omega j); G[t, i, 0] = sum over j with src(j, t) = i of y(j)
    (rows: inputs, one col).
    """
    k, s, m, n = len(axis.taps), axis.stride, axis.outputs, axis.size
    sources = _sources(axis)
    valid = sources >= 0
    if side == "input":
        position = torch.arange(n)
        phase = torch.polar(torch.ones(n, dtype=torch.float64), omega * (position // s).double())
        waves = _windows(n).to(torch.complex128) * phase
        read = torch.where(valid, sources, 0)
        values = waves[:, read] * valid  # (2, k, m)
        matrices = torch.zeros(2, k, m, s, dtype=torch.complex128)
        matrices.scatter_(3, (read % s).view(1, k, m, 1).expand(2, k, m, 1), values.unsqueeze(3))
        norms = torch.zeros(2, s, dtype=torch.float64)
        norms.index_add_(1, position % s, waves.abs().square())
        return _live_rows(matrices), norms
    outputs = torch.arange(m)
    waves = _windows(m).to(torch.complex128) * torch.polar(torch.ones(m, dtype=torch.float64), omega * outputs.double())
    matrices = torch.zeros(2, k, n, 1, dtype=torch.complex128)
    for t in range(k):
        keep = valid[t]
        matrices[:, t, :, 0].index_add_(1, sources[t][keep], waves[:, keep])
    return _live_rows(matrices), waves.abs().square().sum(1, keepdim=True)


def _live_rows(matrices: torch.Tensor) -> torch.Tensor:
    """Without the rows the wave never reaches: they add nothing to ||A z||."""
    live = matrices.abs().amax(dim=(0, 1, 3)) > 0
    return matrices[:, :, live] if bool(live.any()) else matrices[:, :, :1]


def exact_matrices(axis: Axis, side: str) -> torch.Tensor:
    """(taps, rows, cols): B_t (input side) or B_t^T (output side)."""
    b = axis.tap_matrices()
    return b if side == "input" else b.transpose(1, 2)


def _symbol_coefficients(axes: Sequence[Axis], omegas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((candidates, T) complex, (T,) phase index): the polyphase symbol is
    M(omega) = sum_t coefficient[t] W_t e_phase[t]^T, with columns ordered (phase, channel)."""
    grids = list(itertools.product(*(range(len(a.taps)) for a in axes)))
    angle = torch.zeros(omegas.shape[0], len(grids), dtype=torch.float64)
    phases = torch.zeros(len(grids), dtype=torch.long)
    for flat, index in enumerate(grids):
        phase = 0
        for position, (axis, t) in enumerate(zip(axes, index)):
            q, phi = axis.phases()[t]
            phase = phase * axis.stride + phi
            angle[:, flat] += omegas[:, position] * q
        phases[flat] = phase
    return torch.polar(torch.ones_like(angle), angle), phases


def _screen(weight: torch.Tensor, axes: Sequence[Axis], candidates: Sequence[Sequence[float]], side: str
            ) -> tuple[Sequence[float], torch.Tensor]:  # fmt: skip
    """The candidate frequency whose symbol M has the largest norm (a few power steps through
    products with the taps, M never formed) and M's top singular vector on the given side: the
    infinite-size version of the problem."""
    coefficients, phases = _symbol_coefficients(axes, torch.tensor(candidates, dtype=torch.float64))
    out, inp = weight.shape[:2]
    taps = weight.reshape(out, inp, -1).permute(2, 0, 1).contiguous()  # (T, out, in), real
    spatial = math.prod(a.stride for a in axes)
    count = coefficients.shape[0]

    def forward(v: torch.Tensor) -> torch.Tensor:  # (F, S, in) -> (F, out)
        images = torch.view_as_complex(torch.einsum("toi,ftiv->ftov", taps, torch.view_as_real(v[:, phases])))
        return (coefficients.unsqueeze(2) * images).sum(1)

    def backward(u: torch.Tensor) -> torch.Tensor:  # (F, out) -> (F, S, in), the adjoint
        weighted = coefficients.conj().unsqueeze(2) * u.unsqueeze(1)  # (F, T, out)
        images = torch.view_as_complex(torch.einsum("toi,ftov->ftiv", taps, torch.view_as_real(weighted).contiguous()))
        result = torch.zeros(count, spatial, inp, dtype=torch.complex128)
        return result.index_add_(1, phases, images)

    if side == "input":  # power steps on M^H M
        vector = torch.ones(count, spatial, inp, dtype=torch.complex128)
        for _ in range(4):
            vector = backward(forward(vector))
            vector = vector / vector.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, 1, 1)
        quotients = forward(vector).abs().square().sum(1)
        best = int(quotients.argmax())
        return candidates[best], vector[best].reshape(-1)
    vector = torch.ones(count, out, dtype=torch.complex128)  # power steps on M M^H
    for _ in range(4):
        vector = forward(backward(vector))
        vector = vector / vector.norm(dim=1, keepdim=True).clamp_min(1e-300)
    quotients = backward(vector).abs().square().sum(dim=(1, 2))
    best = int(quotients.argmax())
    return candidates[best], vector[best]


def lower_estimate(weight: torch.Tensor, axes: Sequence[Axis], exact: Sequence[bool],
                   candidates: Sequence[Sequence[float]], side: str, start: torch.Tensor | None = None,
                   passes: int = 4) -> float:  # fmt: skip
    """max over windows of ||A z|| / ||z|| for a weight (out, in, *taps) of one group, at the
    candidate frequency (one per non-exact axis) whose symbol is largest."""
    if len(candidates) > 1 and not any(exact):
        best, start = _screen(weight, axes, candidates, side)
        candidates = [best]
    frequency = list(candidates[0])
    count = 1 if all(exact) else 2  # flat and sine windows, one shape on all windowed axes at once
    matrices, norms = [], []
    for axis, keep in zip(axes, exact):
        if keep:
            matrix = exact_matrices(axis, side).to(torch.complex128)
            matrices.append(matrix.unsqueeze(0).expand(count, *matrix.shape).contiguous())
            norms.append(torch.ones(count, matrix.shape[-1], dtype=torch.float64))
        else:
            matrix, norm = window_matrices(axis, frequency.pop(0), side)
            matrices.append(matrix[:count])
            norms.append(norm[:count])
    norm = torch.ones(count, 1, dtype=torch.float64)
    for axis_norm in norms:
        norm = torch.einsum("fa,fb->fab", norm, axis_norm).reshape(count, -1)
    inverse = torch.where(norm > 0, norm.clamp_min(1e-300).rsqrt(), torch.zeros_like(norm))  # (count, S)
    # taps[u..., o, c]: V_t = W_t (input side) or W_t^T (output side); c runs over the free side.
    # Real, so the complex vectors go through as (real, imaginary) pairs: half the work.
    taps = weight.movedim((0, 1), (-2, -1)) if side == "input" else weight.movedim((1, 0), (-2, -1))
    taps = taps.contiguous()
    cols = [m.shape[-1] for m in matrices]
    spatial, channels, rank = math.prod(cols), taps.shape[-1], len(axes)
    tap, col, row = "abcde"[:rank], "fghij"[:rank], "pqrst"[:rank]

    tap_shape = list(taps.shape[:rank])
    flat_taps = taps.reshape(-1, channels)  # (T * other, C)
    other = taps.shape[rank]

    def forward(x: torch.Tensor) -> torch.Tensor:  # (count, *cols, C, b) -> (count, *rows, other, b)
        pairs = torch.view_as_real(x).movedim(rank + 1, 0)  # (C, count, *cols, b, 2)
        y = (flat_taps @ pairs.reshape(channels, -1)).view(*tap_shape, other, *pairs.shape[1:])
        y = torch.view_as_complex(y.movedim(rank + 1, 0).movedim(rank + 1, 2 * rank + 1).contiguous())
        letters = list(tap + col)  # y: (count, *taps, *cols, other, b)
        for i in range(rank):  # axis i: sum over its tap and column, leave its row
            before = "".join(letters)
            letters[i], letters[rank + i] = "", row[i]
            y = torch.einsum(f"z{tap[i]}{row[i]}{col[i]},z{before}yw->z{''.join(letters)}yw", matrices[i], y)
        return y

    def backward(y: torch.Tensor) -> torch.Tensor:  # the adjoint of forward
        letters = ["" for _ in range(rank)] + list(row)
        for i in reversed(range(rank)):
            before = "".join(letters)
            letters[i], letters[rank + i] = tap[i], col[i]
            y = torch.einsum(f"z{tap[i]}{row[i]}{col[i]},z{before}yw->z{''.join(letters)}yw", matrices[i].conj(), y)
        pairs = torch.view_as_real(y)  # (count, *taps, *cols, other, b, 2)
        pairs = pairs.movedim(1 + 2 * rank, 1 + rank).movedim(0, rank + 1)  # (*taps, other, count, *cols, b, 2)
        out = flat_taps.T @ pairs.reshape(flat_taps.shape[0], -1)  # (C, count * cols * b * 2)
        out = out.view(channels, count, *cols, -1, 2).movedim(0, rank + 1)
        return torch.view_as_complex(out.contiguous())

    def apply(block: torch.Tensor) -> torch.Tensor:
        x = block.view(count, spatial, channels, -1) * inverse.view(count, spatial, 1, 1)
        x = backward(forward(x.view(count, *cols, channels, -1)))
        x = x.reshape(count, spatial, channels, -1) * inverse.view(count, spatial, 1, 1)
        return x.reshape(count, spatial * channels, -1)

    generator = torch.Generator().manual_seed(1)
    width = min(spatial * channels, 2)
    begin = torch.randn(spatial * channels, width, generator=generator, dtype=torch.float64).to(torch.complex128)
    begin = begin.expand(count, -1, -1).clone()
    if start is not None and start.numel() == spatial * channels:
        begin[:, :, 0] = start.reshape(-1).to(torch.complex128)
    quotients, _ = block_krylov(apply, begin, passes)
    return math.sqrt(max(float(quotients.max()), 0.0))
