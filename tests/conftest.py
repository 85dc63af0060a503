"""Shared fixtures: small real models with realistic BatchNorm statistics."""

from __future__ import annotations

import torch
from torch import nn

from wssi_audit.models import INPUT_SHAPES, create_model


def with_bn_statistics(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Run a few training-mode passes so BatchNorm has non-trivial running stats, then eval."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        generator = torch.Generator().manual_seed(seed)
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.rand((16, *shape[1:]), generator=generator) * 2 + 0.5)
        # Non-trivial affine parameters too, so folding is really exercised.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                with torch.no_grad():
                    module.weight.uniform_(0.5, 2.0, generator=generator)
                    module.bias.uniform_(-0.5, 0.5, generator=generator)
    return model.eval()


def example_model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    shape = INPUT_SHAPES[name]
    model = with_bn_statistics(create_model(name), shape, seed)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(seed))
