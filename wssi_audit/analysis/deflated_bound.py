"""A proven upper bound on ||A||_2 for a matrix too large for its Gram matrix, at O(m n) cost.

For any orthonormal Q (n x k) and unit x = Q a + r with r orthogonal to range(Q),
    ||A x|| <= ||A Q|| |a| + ||A (I - Q Q^T)|| |r|  <=  sqrt(||A Q||^2 + ||A (I - Q Q^T)||^2)
(Cauchy-Schwarz), and ||A (I - Q Q^T)||_2^2 <= ||A (I - Q Q^T)||_F^2 = ||A||_F^2 - ||A Q||_F^2.
With Q a block Krylov basis of A^T A, A Q holds the top of the spectrum: ||A Q|| is nearly ||A||
and is proven by the Cholesky test on the small k x k Gram matrix; the rest is paid at its
Frobenius norm. Tight when the spectrum is concentrated in a few directions (trained layers
often are); for a random matrix it tends to the Frobenius norm. The cost is a few products with
A and A^T, instead of the m n min(m, n) of the Gram matrix.

Rounding: Q is orthonormal only to rounding, delta = ||Q^T Q - I||_F; then ||A P|| <= ||A Q|| /
sqrt(1 - delta) and ||A P||_F^2 >= ||A Q||_F^2 / (1 + delta) for P the exact projector on range(Q),
and the computed A Q, ||A||_F^2, ||A Q||_F^2 are widened by the standard gamma_k error bounds.
"""

from __future__ import annotations

import math

import torch

from .psd_bound import UNIT_ROUNDOFF, certified_top_eigenvalue, gamma, qr


def deflated_norm_bound(
    matrices: torch.Tensor, *, block: int = 8, passes: int = 3, seed: int = 0
) -> tuple[float, float]:
    """(proven upper bound, Rayleigh-quotient estimate) of max over the batch (g, m, n) of ||A||_2."""
    if matrices.shape[1] < matrices.shape[2]:
        matrices = matrices.transpose(1, 2)
    groups, rows, cols = matrices.shape
    generator = torch.Generator().manual_seed(seed)
    block = min(block, cols)
    current = qr(torch.randn(groups, cols, block, generator=generator, dtype=torch.float64))
    basis = [current]
    for _ in range(max(0, min(passes, cols // block) - 1)):
        image = matrices.transpose(1, 2) @ (matrices @ current)
        everything = torch.cat(basis, dim=2)
        for _ in range(2):
            image = image - everything @ (everything.transpose(1, 2) @ image)
            image = qr(image)
        current = image
        basis.append(current)
    q = qr(torch.cat(basis, dim=2))  # (g, n, k)
    k = q.shape[2]
    delta = torch.linalg.vector_norm(q.transpose(1, 2) @ q - torch.eye(k, dtype=torch.float64), dim=(1, 2))
    delta = delta + gamma(cols + 2) * k
    if float(delta.max()) >= 0.5:  # never with Householder QR; refuse rather than divide by ~0
        raise RuntimeError("the Krylov basis lost orthogonality")
    product = matrices @ q  # (g, m, k)
    product_error = gamma(cols + 2) * torch.linalg.vector_norm(matrices, dim=(1, 2)) * math.sqrt(k) * (1 + delta)
    product_norm = torch.linalg.vector_norm(product, dim=(1, 2))
    gram = product.transpose(1, 2) @ product
    gram_error = gamma(rows + 2) * product_norm.square() + 2 * product_norm * product_error + product_error.square()
    top = certified_top_eigenvalue(gram, gram_error, seed=seed)
    frobenius2 = torch.linalg.vector_norm(matrices, dim=(1, 2)).square() * (1 + gamma(rows * cols + 2))
    captured2 = (product_norm - product_error).clamp_min(0.0).square() * (1 - gamma(rows * k + 2))
    residual2 = (frobenius2 - captured2 / (1 + delta)).clamp_min(0.0)
    upper2 = top.upper / (1 - float(delta.max())) + float(residual2.max())
    return math.sqrt(upper2) * (1 + 8 * UNIT_ROUNDOFF), math.sqrt(max(top.estimate, 0.0))


def deflated_cost(groups: int, rows: int, cols: int, block: int = 8, passes: int = 3) -> float:
    """Rough float64 operations of `deflated_norm_bound`."""
    k = block * passes
    return groups * rows * cols * (4 * block * passes + 2 * k)
