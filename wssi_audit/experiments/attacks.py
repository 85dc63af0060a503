"""Linf attacks (FGSM, PGD) and robustness measures, RobustBench style (science.md s.7):
inputs in [0, 1], normalization inside the model, model in eval mode, clean and robust accuracy
on the same examples. An example counts as robust only if it is classified correctly both clean
and under attack, so robust accuracy <= clean accuracy and eps = 0 gives clean accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PGD_STEPS = 20
PGD_STEP_FACTOR = 2.5  # step size = 2.5 * eps / steps (Madry et al.)


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps, clipped to [0, 1]."""
    if eps == 0:
        return x
    return (x + eps * _input_gradient(model, x, y).sign()).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = PGD_STEPS,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Linf PGD with a uniform random start, `steps` signed steps, projection onto the eps-ball
    and [0, 1]; one restart."""
    if eps == 0:
        return x
    alpha = step_size if step_size is not None else PGD_STEP_FACTOR * eps / steps
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    adv = (x + (2 * noise - 1) * eps).clamp(0.0, 1.0)
    for _ in range(steps):
        adv = adv + alpha * _input_gradient(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return adv


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == y


def evaluate_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: list[float],
    steps: int = PGD_STEPS,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, object]:
    """Clean accuracy, FGSM and PGD robust accuracy for every eps, and the mean input-gradient
    norm ||d CE / d x||_2 (input space [0, 1]). The model is put in eval mode."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    clean_parts, grad_norms = [], []
    fgsm_parts: dict[float, list[torch.Tensor]] = {e: [] for e in eps_values}
    pgd_parts: dict[float, list[torch.Tensor]] = {e: [] for e in eps_values}
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        clean = _correct(model, xb, yb)
        clean_parts.append(clean)
        grad_norms.append(_input_gradient(model, xb, yb).flatten(1).norm(dim=1))
        for eps in eps_values:
            fgsm_parts[eps].append(clean & _correct(model, fgsm(model, xb, yb, eps), yb))
            pgd_parts[eps].append(clean & _correct(model, pgd(model, xb, yb, eps, steps, generator=generator), yb))

    def accuracy(parts: list[torch.Tensor]) -> float:
        return float(torch.cat(parts).float().mean())

    return {
        "clean_accuracy": accuracy(clean_parts),
        "fgsm": {f"{eps:g}": accuracy(fgsm_parts[eps]) for eps in eps_values},
        "pgd": {f"{eps:g}": accuracy(pgd_parts[eps]) for eps in eps_values},
        "input_gradient_norm": float(torch.cat(grad_norms).mean()),
        "attack": {
            "threat_model": "Linf",
            "pgd_steps": steps,
            "pgd_step_size": f"{PGD_STEP_FACTOR}*eps/{steps}",
            "restarts": 1,
            "random_start": True,
            "seed": seed,
            "examples": len(y),
        },
    }
