"""`attach`: the one mechanism that applies the penalty inside an optimizer's step.

Trainer integrations (Lightning, Hugging Face, accelerate) are thin adapters over it, in
`wssi_audit.integrations`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .coverage import Coverage
from .penalty import DEFAULT_FORM, DEFAULT_STRENGTH, WeightScaleRegularizer


@dataclass
class RegularizerHandle:
    """Returned by `attach`; `.remove()` restores the optimizer's groups and removes the hook."""

    regularizer: WeightScaleRegularizer
    optimizer: torch.optim.Optimizer
    _hook: Any
    _moved: list[tuple[dict[str, Any], list[Any], dict[str, Any]]]  # (source group, its old params, new group)
    removed: bool = False

    def penalty(self) -> torch.Tensor:
        return self.regularizer.penalty()

    def coverage(self) -> Coverage:
        return self.regularizer.coverage()

    def remove(self) -> None:
        if self.removed:
            return
        self._hook.remove()
        for source, old_params, new_group in self._moved:
            source["params"] = old_params
            self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g is not new_group]
        self.removed = True


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    strength: float = DEFAULT_STRENGTH,
    form: str = DEFAULT_FORM,
    *,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    regularizer: WeightScaleRegularizer | None = None,
    **options: Any,
) -> RegularizerHandle:
    """Regularize `model` invariantly inside `optimizer`: covered parameters move to param groups with
    weight_decay 0 (copies of their old groups' other settings), and the penalty's gradient is added to
    their `.grad` right before every `optimizer.step()`. Call it before building an LR scheduler (it
    adds param groups). Gradient clipping done before `step()` does not see the penalty's gradient.
    """
    reg = regularizer or WeightScaleRegularizer(model, example_inputs, strength=strength, form=form, **options)
    # Only parameters this optimizer updates (and zeroes) receive the penalty's gradient.
    reg.restrict_gradients_to([p for group in optimizer.param_groups for p in group["params"]])
    covered = {id(p) for p in reg.covered_parameters()}
    moved: list[tuple[dict[str, Any], list[Any], dict[str, Any]]] = []
    for group in list(optimizer.param_groups):
        taken = [p for p in group["params"] if id(p) in covered]
        if not taken:
            continue
        old = list(group["params"])
        group["params"] = [p for p in old if id(p) not in covered]
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group["weight_decay"] = 0.0
        new_group["params"] = taken
        optimizer.param_groups.append(new_group)
        moved.append((group, old, new_group))

    def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        reg.add_gradients_()

    handle = optimizer.register_step_pre_hook(hook)
    return RegularizerHandle(reg, optimizer, handle, moved)
