"""Training arms: no regularization, weight decay, and the invariant regularizer (log / balanced),
with SGD or Adam/AdamW; plus a local reference implementation of the penalty and a prototype
collapse guard (science.md s.4)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis.structure import Structure
from ..auditing import analyze, homogeneous_layers

ARMS = ("none", "wd", "log", "balanced", "log_guard")
INVARIANT_ARMS = ("log", "balanced", "log_guard")

Penalty = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Arm:
    """One regularization arm. `strength` is the weight-decay coefficient for `wd` (coupled L2 in
    SGD, decoupled in AdamW) and lambda of the penalty for the invariant arms."""

    name: str
    strength: float = 0.0
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"

    @property
    def label(self) -> str:
        if self.name == "none":
            return "none"
        return f"{self.name}={self.strength:g}"


def regularized_weights(net: nn.Module, example: torch.Tensor) -> tuple[Structure, dict[str, nn.Parameter]]:
    """The audit's structure of `net` and its homogeneous, non-BatchNorm-fed weights (the ones a
    log-norm penalty may cover, science.md s.6)."""
    analysis = analyze(net, (example,), verify=False)
    covered = homogeneous_layers(analysis.structure)
    params = dict(net.named_parameters())
    weights = {
        layer.weight: params[layer.weight]
        for layer in analysis.structure.layers
        if layer.name in covered and layer.bn is None and layer.weight in params
    }
    return analysis.structure, weights


def _chain_groups(structure: Structure, weights: dict[str, nn.Parameter]) -> list[list[nn.Parameter]]:
    """Covered weights grouped by chain (residual branches are their own chains)."""
    groups = []
    for chain in structure.chains:
        group = [weights[layer.weight] for layer in chain.layers if layer.weight in weights]
        if group:
            groups.append(group)
    return groups


def local_penalty(
    net: nn.Module, example: torch.Tensor, form: str, strength: float, guard_decades: float | None = None
) -> Penalty:
    """Reference penalty, per chain c with log N_c = sum_l log ||W_l||_F:
    `log`: strength * sum_c log N_c;  `balanced`: strength * sum_c L_c N_c^(2/L_c);
    `log_guard`: strength * sum_c max(log N_c, log N_c(init) - guard_decades * ln 10).
    The guard is a function of N_c only, so it stays shift-invariant; below the floor the
    penalty's gradient is zero, so no layer can be driven to zero by the penalty."""
    structure, weights = regularized_weights(net, example)
    groups = _chain_groups(structure, weights)

    def log_norms() -> list[torch.Tensor]:
        return [sum(torch.log(w.norm()) for w in group) for group in groups]  # type: ignore[misc]

    floors: list[float] = []
    if form == "log_guard":
        decades = 1.0 if guard_decades is None else guard_decades
        floors = [float(v.detach()) - decades * math.log(10.0) for v in log_norms()]

    def penalty() -> torch.Tensor:
        terms = log_norms()
        if form == "log":
            total = sum(terms)
        elif form == "balanced":
            total = sum(len(g) * torch.exp(2.0 * t / len(g)) for g, t in zip(groups, terms))
        elif form == "log_guard":
            total = sum(torch.clamp(t, min=f) for t, f in zip(terms, floors))
        else:
            raise ValueError(f"unknown penalty form '{form}'")
        return strength * total  # type: ignore[return-value]

    return penalty


def shared_regularizer_available() -> bool:
    try:
        from ..regularizer import WeightScaleRegularizer  # noqa: F401
    except Exception:
        return False
    return True


def make_penalty(
    model: nn.Module, example: torch.Tensor, arm: Arm, implementation: str = "auto"
) -> tuple[Penalty | None, str]:
    """The arm's penalty (None for `none` / `wd`) and which implementation provides it:
    `shared` (wssi_audit.regularizer.WeightScaleRegularizer) or `local` (local_penalty)."""
    if arm.name not in INVARIANT_ARMS:
        return None, ""
    net = model.net if hasattr(model, "net") else model
    if (
        arm.name == "log_guard"
        or implementation == "local"
        or (implementation == "auto" and not shared_regularizer_available())
    ):
        return local_penalty(net, example, arm.name, arm.strength), "local"
    from ..regularizer import WeightScaleRegularizer

    regularizer = WeightScaleRegularizer(net, example_inputs=(example,), form=arm.name, strength=arm.strength)
    return regularizer.penalty, "shared"


def make_optimizer(model: nn.Module, arm: Arm, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9) or Adam; weight decay (arm `wd`) applies to conv/linear weights only
    (tensors of dim > 1), coupled for SGD and decoupled (AdamW) for Adam."""
    decay = arm.strength if arm.name == "wd" else 0.0
    matrices = [p for p in model.parameters() if p.dim() > 1]
    others = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": matrices, "weight_decay": decay}, {"params": others, "weight_decay": 0.0}]
    if arm.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if arm.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=lr) if decay else torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer '{arm.optimizer}'")


def weight_decay_penalty(net: nn.Module) -> float:
    """sum ||W||_F^2 over conv/linear weights (what weight decay penalizes, up to its coefficient)."""
    return float(sum(float(p.detach().double().pow(2).sum()) for p in net.parameters() if p.dim() > 1))
