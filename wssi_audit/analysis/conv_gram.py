"""The Hermitian PSD blocks whose largest eigenvalue bounds ||A||^2 for a convolution A.

A = sum_t W_t (x) B_t over kernel taps t (conv_geometry). Its Gram matrix is
    A^T A = sum_{t,t'} (B_t^T B_t') (x) (W_t^T W_t')        (input side)
    A A^T = sum_{t,t'} (B_t B_t'^T) (x) (W_t W_t'^T)        (output side, used when smaller),
and the spatial factor is a Kronecker product over axes. An exact axis keeps its n x n (or
m x m) factor. A circulant axis is replaced by the ring of length N it embeds into
(conv_geometry.Axis.circulant_period): in the polyphase form its factor for the pair is
exp(i omega (q_t' - q_t)) at phase block (phi_t, phi_t') (input side), or
exp(i omega (q_t - q_t')) when phi_t = phi_t' and 0 otherwise (output side), one block per
frequency omega = 2 pi r / (N / s). Pairs with the same phase blocks and the same lag share that
factor, so their Gram blocks W_t^T W_t' are summed first ("keys"), and each frequency's block is
a small complex combination of the key sums.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .conv_geometry import Axis
from .psd_bound import gamma


@dataclass
class GramBlocks:
    matrices: torch.Tensor  # (groups * frequencies, D, D), groups slowest
    errors: torch.Tensor  # (groups * frequencies,): bounds on ||computed - exact||_2
    frequencies: list[tuple[int, ...]]  # per block: the frequency index on each circulant axis


def unique_frequencies(periods: Sequence[int]) -> list[tuple[int, ...]]:
    """One frequency of each pair {omega, -omega}: for a real kernel their blocks are conjugate."""
    grid = itertools.product(*(range(p) for p in periods))
    return [r for r in grid if r <= tuple((-x) % p for x, p in zip(r, periods))]


def frequency_count(periods: Sequence[int]) -> int:
    """len(unique_frequencies(periods)) without listing them: the pairs {omega, -omega} of the
    prod(periods) frequencies, plus the frequencies equal to their own negative (per axis 0, and
    p / 2 when p is even), which pair with themselves."""
    total, own = math.prod(periods), math.prod(2 if p % 2 == 0 else 1 for p in periods)
    return (total + own) // 2


def exact_pattern(axis: Axis, side: str) -> torch.Tensor:
    """(taps, taps, a, a): B_t^T B_t' (input side, a = size) or B_t B_t'^T (output side, a = outputs)."""
    b = axis.tap_matrices()
    return torch.einsum("tji,ujl->tuil", b, b) if side == "input" else torch.einsum("tji,uli->tujl", b, b)


@dataclass(frozen=True)
class _AxisPairs:
    """For every pair of taps (t, t') of one axis: which phase block it lands in, its lag, and
    whether it contributes at all; `patterns[block]` is the axis's factor for that block."""

    block: torch.Tensor  # (k, k) int
    lag: torch.Tensor  # (k, k) int, modulo the number of frequencies
    valid: torch.Tensor  # (k, k) bool
    patterns: torch.Tensor  # (blocks, a, a) real
    period: int  # number of frequencies (1 for an exact axis)


def _axis_pairs(axis: Axis, exact: bool, period: int, side: str) -> _AxisPairs:
    k = len(axis.taps)
    if exact:
        pattern = exact_pattern(axis, side)
        index = torch.arange(k * k).view(k, k)
        valid = pattern.abs().amax(dim=(2, 3)) > 0
        return _AxisPairs(
            index, torch.zeros(k, k, dtype=torch.long), valid, pattern.reshape(k * k, *pattern.shape[2:]), 1
        )
    q = torch.tensor([p[0] for p in axis.phases()])
    phi = torch.tensor([p[1] for p in axis.phases()])
    s = axis.stride
    if side == "input":
        block = phi.view(-1, 1) * s + phi.view(1, -1)
        patterns = torch.zeros(s * s, s, s, dtype=torch.float64)
        for a in range(s):
            for b in range(s):
                patterns[a * s + b, a, b] = 1.0
        lag = (q.view(1, -1) - q.view(-1, 1)) % period
        return _AxisPairs(block, lag, torch.ones(k, k, dtype=torch.bool), patterns, period)
    valid = phi.view(-1, 1) == phi.view(1, -1)
    lag = (q.view(-1, 1) - q.view(1, -1)) % period
    return _AxisPairs(torch.zeros(k, k, dtype=torch.long), lag, valid, torch.ones(1, 1, 1, dtype=torch.float64), period)


def _over_all_pairs(per_axis: list[torch.Tensor], radices: list[int]) -> torch.Tensor:
    """(T, T): combine per-axis (k, k) values into one mixed-radix value per pair of flattened
    taps (axis 0 slowest), as the weight's taps are flattened."""
    combined = torch.zeros(1, 1, dtype=torch.long)
    for values, radix in zip(per_axis, radices):
        x, k = combined.shape[0], values.shape[0]
        combined = (combined.view(x, 1, x, 1) * radix + values.view(1, k, 1, k)).reshape(x * k, x * k)
    return combined


def gram_blocks(weight: torch.Tensor, axes: Sequence[Axis], exact: Sequence[bool], periods: Sequence[int],
                side: str) -> GramBlocks:  # fmt: skip
    """The blocks for a grouped weight (groups, out, in, *taps), one per group and frequency."""
    groups, out, inp = weight.shape[:3]
    pairs = [_axis_pairs(a, e, p, side) for a, e, p in zip(axes, exact, periods)]
    block_counts = [p.patterns.shape[0] for p in pairs]
    block = _over_all_pairs([p.block for p in pairs], block_counts)
    lag = _over_all_pairs([p.lag for p in pairs], [p.period for p in pairs])
    valid = torch.ones_like(block, dtype=torch.bool)
    norm = torch.ones(block.shape, dtype=torch.float64)
    for index, p in enumerate(pairs):
        valid &= _expand(p.valid, pairs, index)
        norm *= _expand(p.patterns.square().sum((1, 2)).sqrt()[p.block], pairs, index)
    lags = math.prod(p.period for p in pairs)
    key = block * lags + lag
    taps = weight.reshape(groups, out, inp, -1).permute(0, 3, 1, 2)  # (g, T, out, in)
    if side == "output":
        taps = taps.transpose(2, 3)
    taps = taps.contiguous()  # (g, T, other, C): the Gram block of (t, t') is taps[t]^T taps[t']
    keys, key_index = torch.unique(key[valid], return_inverse=True)
    where = torch.full_like(key, -1)
    where[valid] = key_index
    count, other, size = taps.shape[1], taps.shape[2], taps.shape[3]
    sums = torch.zeros(groups, len(keys), size, size, dtype=torch.float64)
    for t in range(count):
        partners = [u for u in range(t, count) if valid[t, u]]
        if not partners:
            continue
        right = taps[:, partners].permute(0, 2, 1, 3).reshape(groups, other, len(partners) * size)
        products = (taps[:, t].transpose(1, 2) @ right).view(groups, size, len(partners), size).transpose(1, 2)
        sums.index_add_(1, where[t, partners], products)
        mirrored = [i for i, u in enumerate(partners) if u != t]
        if mirrored:
            back = torch.tensor([partners[i] for i in mirrored])
            sums.index_add_(1, where[back, t], products[:, mirrored].transpose(-1, -2))
    # Frequencies: each key's lag becomes a phase factor; keys of one block are combined.
    circulant = [i for i, e in enumerate(exact) if not e]
    frequencies = unique_frequencies([periods[i] for i in circulant])
    key_block, key_lag = keys // lags, keys % lags
    lag_digits = _digits(key_lag, [p.period for p in pairs])
    blocks_used, key_slot = torch.unique(key_block, return_inverse=True)
    flat = sums.permute(1, 0, 2, 3).reshape(len(keys), -1)  # (K, g * C * C)
    if circulant:
        combined = torch.empty(len(frequencies), len(blocks_used), flat.shape[1], dtype=torch.complex128)
        r = torch.tensor(frequencies, dtype=torch.float64).view(len(frequencies), -1)  # (F, circulant axes)
        steps = torch.tensor([2 * math.pi / periods[axis] for axis in circulant], dtype=torch.float64)
        lags_of_keys = torch.stack([lag_digits[axis] for axis in circulant], dim=1).double()  # (K, circulant axes)
        for slot in range(len(blocks_used)):  # one block's keys: a phase factor per frequency each
            members = (key_slot == slot).nonzero().view(-1)
            angle = (r * steps) @ lags_of_keys[members].T  # (F, members)
            phase = torch.polar(torch.ones_like(angle), angle)
            combined[:, slot] = torch.complex(phase.real @ flat[members], phase.imag @ flat[members])
    else:
        one_hot = torch.zeros(len(blocks_used), len(keys), dtype=torch.float64)
        one_hot[key_slot, torch.arange(len(keys))] = 1.0
        combined = (one_hot @ flat).unsqueeze(0)
    combined = combined.view(len(frequencies), len(blocks_used), groups, size, size).permute(2, 0, 1, 3, 4)
    patterns = _block_patterns(pairs, blocks_used)
    spatial = patterns.shape[-1]
    if spatial == 1 and len(blocks_used) == 1:
        matrices = combined[:, :, 0]
    else:
        matrices = torch.einsum("pab,gfpcd->gfacbd", patterns.to(combined.dtype), combined)
    matrices = matrices.reshape(groups * len(frequencies), spatial * size, spatial * size)
    inner = other + count * count + len(keys) + len(blocks_used) + 16
    tap_norms = taps.square().sum((2, 3)).sqrt()  # (g, T)
    total = torch.einsum("tu,gt,gu->g", norm * valid, tap_norms, tap_norms)
    errors = (gamma(inner) * total).repeat_interleave(len(frequencies))
    return GramBlocks(matrices, errors, frequencies)


def _expand(values: torch.Tensor, pairs: list[_AxisPairs], index: int) -> torch.Tensor:
    """A per-axis (k, k) tensor broadcast to all (T, T) pairs of flattened taps."""
    sizes = [p.block.shape[0] for p in pairs]
    shape = [1] * (2 * len(sizes))
    shape[index], shape[len(sizes) + index] = sizes[index], sizes[index]
    full = values.reshape(shape).expand(*sizes, *sizes)
    total = math.prod(sizes)
    return full.reshape(total, total)


def _digits(values: torch.Tensor, radices: list[int]) -> list[torch.Tensor]:
    """Mixed-radix digits of `values`, axis 0 most significant."""
    digits = []
    for radix in reversed(radices):
        digits.append(values % radix)
        values = values // radix
    return digits[::-1]


def _block_patterns(pairs: list[_AxisPairs], blocks: torch.Tensor) -> torch.Tensor:
    """(blocks, S, S): Kronecker product over axes of each block's per-axis factor."""
    digits = _digits(blocks, [p.patterns.shape[0] for p in pairs])
    combined = torch.ones(len(blocks), 1, 1, dtype=torch.float64)
    for p, digit in zip(pairs, digits):
        chosen = p.patterns[digit]
        n, a, _ = combined.shape
        c = chosen.shape[1]
        combined = torch.einsum("nab,ncd->nacbd", combined, chosen).reshape(n, a * c, a * c)
    return combined
