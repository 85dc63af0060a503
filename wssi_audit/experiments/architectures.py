"""Experiment architectures (all ReLU), each wrapped so that inputs in [0, 1] are normalized
inside the model (RobustBench convention, science.md s.7)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import create_model, mlp

ARCHITECTURES = ("mlp", "vgg", "resnet_nobn", "resnet_bn")
CHAIN_ARCHITECTURES = ("mlp", "vgg")  # plain homogeneous chains: the shift regimes use these


class Normalized(nn.Module):
    """(x - mean) / std, then the network `net`; the audit and the regularizer look at `net`."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def deep_mlp(in_features: int, classes: int, width: int = 64, depth: int = 7) -> nn.Module:
    """A `depth`-layer ReLU MLP (one homogeneous chain of `depth` Linear layers)."""
    return mlp(in_features=in_features, hidden=width, depth=depth, classes=classes)


def vgg(input_shape: tuple[int, ...], classes: int, channels: int = 16) -> nn.Module:
    """VGG-style CNN without BatchNorm: 4 convs (two max-pools), 2 linears; 1-D convs for
    (C, L) inputs, 2-D convs for (C, H, W) inputs."""
    two_d = len(input_shape) == 3
    conv = nn.Conv2d if two_d else nn.Conv1d
    pool = nn.MaxPool2d if two_d else nn.MaxPool1d
    c = channels
    spatial = math.prod(input_shape[1:]) // (16 if two_d else 4)
    return nn.Sequential(
        conv(input_shape[0], c, 3, padding=1),
        nn.ReLU(),
        conv(c, c, 3, padding=1),
        nn.ReLU(),
        pool(2),
        conv(c, 2 * c, 3, padding=1),
        nn.ReLU(),
        conv(2 * c, 2 * c, 3, padding=1),
        nn.ReLU(),
        pool(2),
        nn.Flatten(),
        nn.Linear(2 * c * spatial, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def build_model(arch: str, input_shape: tuple[int, ...], classes: int, mean: float, std: float) -> Normalized:
    """One of ARCHITECTURES for a dataset's input shape; ResNets need (C, H, W) images."""
    if arch == "mlp":
        net = deep_mlp(math.prod(input_shape), classes)
    elif arch == "vgg":
        net = vgg(input_shape, classes)
    elif arch in ("resnet_nobn", "resnet_bn"):
        if len(input_shape) != 3:
            raise ValueError(f"{arch} needs image inputs, got shape {input_shape}")
        net = create_model(arch, widths=(16, 32), blocks=1, classes=classes, in_channels=input_shape[0])
    else:
        raise KeyError(f"unknown architecture '{arch}' ({', '.join(ARCHITECTURES)})")
    return Normalized(net, mean, std)
