"""A proven upper bound on the largest eigenvalue of a batch of Hermitian PSD matrices.

A block Krylov method estimates each top eigenvalue from below; a Cholesky factorization proves the
bound: U I - H is positive semidefinite iff every eigenvalue of H is at most U, and a Cholesky
factorization of a matrix exists iff it is positive definite. In floating point we use Rump's
theorem (S. M. Rump, "Verification of positive definiteness", BIT 46, 2006): if the floating-point
Cholesky factorization of X - c I runs to completion with c >= gamma_{n+1} / (1 - gamma_{n+1})
trace(X) (gamma_k = k u / (1 - k u), u = 2^-53), then X is positive definite. We take c with twice
that constant and gamma_{2n+2} (room for complex arithmetic), and subtract the caller's bound on
how far the computed H may be from the exact one. The margins are below 1e-9 relative for
matrices up to 10^4 rows, so the proven bound is as tight as the estimate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = 2.0**-53
SMALL = 32  # matrices up to this size get a full eigendecomposition instead of Krylov estimates


def qr(matrix: torch.Tensor) -> torch.Tensor:
    """The Q of a (batched) Householder QR."""
    return torch.linalg.qr(matrix).Q


def gamma(k: int) -> float:
    """gamma_k = k u / (1 - k u): the classic bound on the relative error of k float64 operations."""
    return k * UNIT_ROUNDOFF / (1.0 - k * UNIT_ROUNDOFF)


@dataclass
class TopEigenvalue:
    upper: float  # proven: every eigenvalue of every exact matrix is <= upper
    estimate: float  # the largest Rayleigh quotient seen, an estimate from below
    index: int  # which matrix of the batch has that Rayleigh quotient
    vector: torch.Tensor  # its unit vector


def proves_bound(matrices: torch.Tensor, bound: float, errors: torch.Tensor) -> torch.Tensor:
    """(batch,) bool: True where the Cholesky test proves lambda_max(H_exact) <= bound, given
    ||H_computed - H_exact||_2 <= errors. False only means 'not proven'."""
    size = matrices.shape[-1]
    diagonal = torch.diagonal(matrices, dim1=-2, dim2=-1).real
    trace = (bound * size - diagonal.sum(-1)).clamp_min(0.0) * (1 + gamma(size + 2))  # trace(U I - H)
    g = gamma(2 * size + 2)
    margin = errors + 2.0 * g / (1.0 - g) * trace + 1e-290
    shifted = matrices.neg()
    torch.diagonal(shifted, dim1=-2, dim2=-1).add_((bound - margin).view(-1, 1).to(shifted.dtype))
    _, info = torch.linalg.cholesky_ex(shifted)
    return info == 0


def _power(matrices: torch.Tensor, vectors: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A few power steps: cheap Rayleigh quotients (from below) for every matrix of a batch."""
    for _ in range(steps):
        vectors = matrices @ vectors
        vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (vectors.conj() * (matrices @ vectors)).sum(dim=(1, 2)).real, vectors


def block_krylov(
    apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, passes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Rayleigh quotients, unit vectors): the top Ritz pair of each matrix over the block Krylov
    space [X, HX, ..., H^(passes-1) X] of the (batch, n, b) start block, orthonormalised;
    `apply(X)` returns the batch of products H X.

    The value returned is the Rayleigh quotient of the top Ritz vector, so it never exceeds
    lambda_max. A block costs about as much as one vector per pass (the
    products are bounded by reading H), and reaches the top of a clustered spectrum in a few
    passes where power iteration needs hundreds."""
    size = start.shape[1]
    width = start.shape[-1]
    passes = max(1, min(passes, size // max(width, 1)))
    block = qr(start)
    blocks, images = [], []
    for step in range(passes):
        blocks.append(block)
        image = apply(block)
        images.append(image)
        if step + 1 == passes:
            break
        basis = torch.cat(blocks, dim=2)
        for _ in range(2):  # block Gram-Schmidt against the whole basis, then QR; twice, because
            image = image - basis @ (basis.mH @ image)  # QR of a vanishing residual (an invariant
            image = qr(image)  # subspace found) returns arbitrary directions
        block = image
    basis, products = torch.cat(blocks, dim=2), torch.cat(images, dim=2)
    projected = basis.mH @ products
    projected = 0.5 * (projected + projected.mH)
    _, ritz = torch.linalg.eigh(projected)
    vectors = basis @ ritz[:, :, -1:]
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # The Rayleigh quotient of the returned vector itself: an estimate from below even if the
    # basis lost orthogonality to rounding.
    quotients = (vectors.conj() * apply(vectors)).sum(dim=(1, 2)).real
    return quotients, vectors


def certified_top_eigenvalue(
    matrices: torch.Tensor, errors: torch.Tensor | None = None, *, seed: int = 0, slack: float = 5e-4
) -> TopEigenvalue:
    """Proven upper bound on max over the batch of lambda_max, within about `slack` of the estimate.

    A few power steps on every matrix and block Krylov on the most promising give
    U = (1 + slack) * best estimate; the Cholesky test then proves U for every matrix. Where it
    cannot, that matrix's estimate was too low: iterate on it longer (restarted from its Ritz
    vector) and raise U until the test passes.
    """
    batch, size = matrices.shape[0], matrices.shape[-1]
    errors = torch.zeros(batch, dtype=torch.float64) if errors is None else errors
    if batch == 0 or size == 0:
        return TopEigenvalue(0.0, 0.0, 0, torch.zeros(size, dtype=matrices.dtype))
    if size == 1:
        values = matrices[:, 0, 0].real
        index = int(values.argmax())
        upper = float(values[index] + errors[index]) * (1 + 4 * UNIT_ROUNDOFF)
        return TopEigenvalue(max(upper, 0.0), float(values[index]), index, torch.ones(1, dtype=matrices.dtype))
    if float(torch.diagonal(matrices, dim1=-2, dim2=-1).real.amax()) <= 0.0:  # PSD with a zero diagonal: H = 0
        return TopEigenvalue(float(errors.max()) + 1e-290, 0.0, 0, torch.ones(size, dtype=matrices.dtype) / size**0.5)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, size, 4, generator=generator, dtype=torch.float64).to(matrices.dtype)
    if size <= SMALL:
        values, eigenvectors = torch.linalg.eigh(matrices)
        quotients, vectors = values[:, -1].clone(), eigenvectors[:, :, -1:].clone()
    else:  # a few power steps everywhere, block Krylov where the top may be
        quotients, vectors = _power(matrices, noise[:, :, :1], steps=6)
        top = torch.argsort(quotients, descending=True)[:8]
        subset = matrices[top]
        better, moved = block_krylov(lambda x: subset @ x, torch.cat([vectors[top], noise[top, :, 1:]], 2), 10)
        improved = better > quotients[top]
        quotients[top] = torch.where(improved, better, quotients[top])
        vectors[top] = torch.where(improved.view(-1, 1, 1), moved, vectors[top])
    bound = max(float(quotients.max()) * (1 + slack), 1e-280)
    pending = torch.arange(batch)
    for round_ in range(60):
        tested = matrices if pending.numel() == batch else matrices[pending]
        proven = proves_bound(tested, bound, errors[pending])
        pending = pending[~proven]
        if pending.numel() == 0:
            break
        if round_ < 4:  # the estimate was low: refine it where the test failed
            subset = matrices[pending]
            restart = torch.cat([vectors[pending], noise[pending, :, 1:]], dim=2)
            better, moved = block_krylov(lambda x, h=subset: h @ x, restart, passes=10 * (round_ + 2))
            improved = better > quotients[pending]
            quotients[pending] = torch.where(improved, better, quotients[pending])
            vectors[pending] = torch.where(improved.view(-1, 1, 1), moved, vectors[pending])
            bound = max(bound * (1 + slack), float(quotients[pending].max()) * (1 + slack))
        else:  # give up tightness, never correctness: double until proven
            bound *= 2.0
    else:
        raise RuntimeError("the Cholesky test did not prove a bound in 60 rounds")
    index = int(quotients.argmax())
    return TopEigenvalue(bound, float(quotients[index]), index, vectors[index, :, 0])
