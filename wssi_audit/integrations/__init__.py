"""Trainer integrations of the invariant regularizer: thin adapters over `wssi_audit.attach`.

* `wssi_audit.integrations.lightning`: `WeightScaleRegularization`, a Lightning `Callback`;
* `wssi_audit.integrations.huggingface`: `WeightScaleRegularizedTrainer` (and its mixin), a
  transformers `Trainer` whose `create_optimizer` attaches the regularizer;
* accelerate needs no adapter: `attach` unwraps `AcceleratedOptimizer` / `AcceleratedScheduler`.

Each module imports its framework on import, so import the one you use (install the extra:
``pip install "wssi-audit[integrations]"``); the core package never needs them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def resolve_module(model: nn.Module, module: str | nn.Module | None) -> nn.Module:
    """The part of `model` to regularize: itself, a submodule given by its dotted name, or a module."""
    if module is None:
        return model
    if isinstance(module, nn.Module):
        return module
    try:
        return model.get_submodule(module)
    except AttributeError:
        raise ValueError(f"the model has no submodule '{module}'") from None


def on_device_of(module: nn.Module, example: Any) -> Any:
    """Example inputs moved to the device of the module's first parameter (tensors, tuples, lists)."""
    first = next(module.parameters(), None)
    if first is None or example is None:
        return example
    if torch.is_tensor(example):
        return example.to(first.device)
    if isinstance(example, tuple | list):
        return type(example)(on_device_of(module, e) for e in example)
    return example
