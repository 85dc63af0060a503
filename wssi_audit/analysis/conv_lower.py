"""A lower estimate of a convolution's operator norm: ||A z|| / ||z|| for an explicit input z.

Axes kept exact carry any vector; along the other axes z is a plane wave at a chosen frequency
under a flat or a sine window (the shape of a Toeplitz matrix's top singular vectors). For a
fixed wave the best z over channels and exact positions is the top eigenvector of a small
Hermitian matrix, which a block Krylov method reaches through products with A^T A (or A A^T)
computed from the taps, never formed: sum_{t,t'} pattern_{t,t'} (x) W_t^T W_t'.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .conv_geometry import Axis
from .conv_gram import exact_pattern
from .psd_bound import block_krylov


def _windows(count: int) -> torch.Tensor:
    """(2, count): a flat window and a sine window."""
    position = torch.arange(count, dtype=torch.float64)
    return torch.stack([torch.ones(count, dtype=torch.float64), torch.sin(math.pi * (position + 1) / (count + 1))])


def _sources(axis: Axis) -> torch.Tensor:
    """(taps, outputs): the input position each output reads through each tap, -1 for a zero."""
    rows = [[axis.source(j, t) for j in range(axis.outputs)] for t in range(len(axis.taps))]
    return torch.tensor([[-1 if i is None else i for i in row] for row in rows], dtype=torch.long)


def window_pattern(axis: Axis, omega: float, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """((2, taps, taps, a, a), (2, a)): the Gram pattern of A along this axis on a windowed plane
    wave, and the squared norm of the wave per input phase (input side) or in all (output side).

    Input side, phases phi of the stride s: z_phi(i) = [i = phi mod s] w(i) exp(i omega floor(i/s)),
    pattern[t, t', phi, phi'] = sum_j conj(z_phi(src(j, t))) z_phi'(src(j, t')).
    Output side: y(j) = w(j) exp(i omega j), Y_t(i) = sum over j with src(j, t) = i of y(j),
    pattern[t, t'] = sum_i conj(Y_t(i)) Y_t'(i).
    """
    k, s, m, n = len(axis.taps), axis.stride, axis.outputs, axis.size
    sources = _sources(axis)
    valid = sources >= 0
    if side == "input":
        position = torch.arange(n)
        phase = torch.polar(torch.ones(n, dtype=torch.float64), omega * (position // s).double())
        waves = _windows(n).to(torch.complex128) * phase
        read = torch.where(valid, sources, 0)
        values = waves[:, read] * valid
        z = torch.zeros(2, k, s, m, dtype=torch.complex128)
        z.scatter_(2, (read % s).view(1, k, 1, m).expand(2, k, 1, m), values.unsqueeze(2))
        pattern = torch.einsum("wtpj,wuqj->wtupq", z.conj(), z)
        norms = torch.zeros(2, s, dtype=torch.float64)
        norms.index_add_(1, position % s, waves.abs().square())
        return pattern, norms
    outputs = torch.arange(m)
    waves = _windows(m).to(torch.complex128) * torch.polar(torch.ones(m, dtype=torch.float64), omega * outputs.double())
    y = torch.zeros(2, k, n, dtype=torch.complex128)
    for t in range(k):
        keep = valid[t]
        y[:, t].index_add_(1, sources[t][keep], waves[:, keep])
    pattern = torch.einsum("wti,wui->wtu", y.conj(), y).view(2, k, k, 1, 1)
    return pattern, waves.abs().square().sum(1, keepdim=True)


def _kron(
    per_axis: list[torch.Tensor], norms: list[torch.Tensor], picks: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per combination of per-axis choices: (T, T, S, S) patterns and (S,) squared norms."""
    count = len(picks[0]) if picks else 1
    pattern = torch.ones(count, 1, 1, 1, 1, dtype=torch.complex128)
    weight = torch.ones(count, 1, dtype=torch.float64)
    for axis_pattern, axis_norm, pick in zip(per_axis, norms, picks):
        chosen, chosen_norm = axis_pattern[pick].to(torch.complex128), axis_norm[pick]
        x, _, a, _ = pattern.shape[1:]
        k, _, c, _ = chosen.shape[1:]
        pattern = torch.einsum("fxyAB,ftuab->fxtyuAaBb", pattern, chosen).reshape(count, x * k, x * k, a * c, a * c)
        weight = torch.einsum("fa,fb->fab", weight, chosen_norm).reshape(count, -1)
    return pattern, weight


def _symbol(weight: torch.Tensor, axes: Sequence[Axis], omegas: torch.Tensor) -> torch.Tensor:
    """(candidates, out, S * in): the polyphase symbol sum_t W_t exp(i omega . q_t) e_phi_t^T,
    columns ordered (phase, channel) as the Gram blocks order them."""
    out, inp = weight.shape[:2]
    taps = weight.reshape(out, inp, -1)
    count = omegas.shape[0]
    spatial = math.prod(a.stride for a in axes)
    symbol = torch.zeros(count, out, spatial, inp, dtype=torch.complex128)
    grids = itertools.product(*(range(len(a.taps)) for a in axes))
    for flat, index in enumerate(grids):
        phase, angle = 0, torch.zeros(count, dtype=torch.float64)
        for position, (axis, t) in enumerate(zip(axes, index)):
            q, phi = axis.phases()[t]
            phase = phase * axis.stride + phi
            angle = angle + omegas[:, position] * q
        symbol[:, :, phase] += torch.polar(torch.ones_like(angle), angle).view(-1, 1, 1) * taps[:, :, flat]
    return symbol.reshape(count, out, spatial * inp)


def _screen(weight: torch.Tensor, axes: Sequence[Axis], candidates: Sequence[Sequence[float]], side: str
            ) -> tuple[Sequence[float], torch.Tensor]:  # fmt: skip
    """The candidate frequency whose symbol has the largest norm (a few power steps) and that
    symbol's top singular vector on the given side: the infinite-size version of the problem."""
    symbol = _symbol(weight, axes, torch.tensor(candidates, dtype=torch.float64))
    gram = symbol.mH @ symbol if side == "input" else symbol @ symbol.mH
    vector = torch.ones(gram.shape[0], gram.shape[1], 1, dtype=torch.complex128)
    for _ in range(4):
        vector = gram @ vector
        vector = vector / vector.norm(dim=1, keepdim=True).clamp_min(1e-300)
    quotients = (vector.conj() * (gram @ vector)).sum(dim=(1, 2)).real
    best = int(quotients.argmax())
    return candidates[best], vector[best, :, 0]


def lower_estimate(weight: torch.Tensor, axes: Sequence[Axis], exact: Sequence[bool],
                   candidates: Sequence[Sequence[float]], side: str, start: torch.Tensor | None = None,
                   passes: int = 6) -> float:  # fmt: skip
    """max over windows of ||A z|| / ||z|| for a weight (out, in, *taps) of one group, at the
    candidate frequency (one per non-exact axis) whose symbol is largest."""
    if len(candidates) > 1 and not any(exact):
        best, start = _screen(weight, axes, candidates, side)
        candidates = [best]
    elif len(candidates) > 1:
        candidates = [candidates[0]]
    per_axis, norms, choices = [], [], []
    for axis, keep in zip(axes, exact):
        if keep:
            pattern = exact_pattern(axis, side).unsqueeze(0)
            per_axis.append([pattern])
            norms.append([torch.ones(1, pattern.shape[-1], dtype=torch.float64)])
            choices.append([0])
        else:
            per_axis.append([])
            norms.append([])
            choices.append([0, 1])
    # One window shape for all non-exact axes at once: flat everywhere, or sine everywhere.
    windowed = [i for i, keep in enumerate(exact) if not keep]
    patterns, weights = [], []
    for candidate in candidates:
        axis_patterns, axis_norms, slot = [], [], 0
        for index, keep in enumerate(exact):
            if keep:
                axis_patterns.append(per_axis[index][0])
                axis_norms.append(norms[index][0])
            else:
                pattern, norm = window_pattern(axes[index], candidate[slot], side)
                slot += 1
                axis_patterns.append(pattern)
                axis_norms.append(norm)
        combos = [tuple(w if i in windowed else 0 for i in range(len(axes))) for w in (0, 1)] if windowed else [()]
        combos = combos if windowed else [tuple(0 for _ in axes)]
        picks = [[c[i] for c in combos] for i in range(len(axes))]
        pattern, weight_ = _kron(axis_patterns, axis_norms, picks)
        patterns.append(pattern)
        weights.append(weight_)
    pattern, norm = torch.cat(patterns), torch.cat(weights)
    taps = weight.reshape(weight.shape[0], weight.shape[1], -1).permute(2, 0, 1).to(torch.complex128)  # (T, out, in)
    if side == "output":
        taps = taps.transpose(1, 2)  # (T, in, out): now the input-side formulas apply
    inverse = torch.where(norm > 0, norm.clamp_min(1e-300).rsqrt(), torch.zeros_like(norm))  # (B, S)
    count, spatial, channels = pattern.shape[0], pattern.shape[-1], taps.shape[2]

    def apply(block: torch.Tensor) -> torch.Tensor:
        x = block.view(count, spatial, channels, -1) * inverse.view(count, spatial, 1, 1)
        images = torch.einsum("uoc,nscb->nusob", taps, x)
        mixed = torch.einsum("ntuas,nusob->ntaob", pattern, images)
        out = torch.einsum("toc,ntaob->nacb", taps.conj(), mixed)
        return (out * inverse.view(count, spatial, 1, 1)).reshape(count, spatial * channels, -1)

    generator = torch.Generator().manual_seed(1)
    width = min(spatial * channels, 2)
    begin = torch.randn(spatial * channels, width, generator=generator, dtype=torch.float64).to(torch.complex128)
    begin = begin.expand(count, -1, -1).clone()
    if start is not None and start.numel() == spatial * channels:
        begin[:, :, 0] = start.reshape(-1).to(torch.complex128)
    quotients, _ = block_krylov(apply, begin, passes)
    return math.sqrt(max(float(quotients.max()), 0.0))
