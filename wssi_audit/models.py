"""Small example architectures, in a registry (timm style): the demo, the examples, the tests
and the experiments all build their networks here."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def create_model(name: str, **kwargs: object) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}' (choose from {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](**kwargs)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, cheaply (no training passes), so
    that folding is really exercised on randomly initialised real architectures. Returns the model
    in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            count = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(0.2 * torch.randn(count, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(count, generator=generator))
                module.weight.copy_(0.5 + torch.rand(count, generator=generator))
                module.bias.copy_(0.2 * torch.randn(count, generator=generator))
    return model.eval()


# Example input shape of each model, as given to --input-shape.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {}


@register("mlp")
def mlp(in_features: int = 64, hidden: int = 64, depth: int = 4, classes: int = 10) -> nn.Module:
    """A plain ReLU MLP: one homogeneous chain."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


INPUT_SHAPES["mlp"] = (2, 1, 8, 8)


@register("cnn")
def cnn(channels: int = 16, classes: int = 10, in_channels: int = 1, batch_norm: bool = False) -> nn.Module:
    """A VGG-style CNN on 8x8 inputs: conv, ReLU, max-pool, linear head."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        bn: list[nn.Module] = [nn.BatchNorm2d(cout)] if batch_norm else []
        return [nn.Conv2d(cin, cout, 3, padding=1), *bn, nn.ReLU()]

    return nn.Sequential(
        *block(in_channels, channels),
        *block(channels, channels),
        nn.MaxPool2d(2),
        *block(channels, 2 * channels),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, classes),
    )


INPUT_SHAPES["cnn"] = (2, 1, 8, 8)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, batch_norm: bool = True) -> None:
        super().__init__()
        bias = not batch_norm
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            self.downsample = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet with BasicBlocks; `batch_norm=False` gives the BN-free variant."""

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32),
        blocks: int = 2,
        classes: int = 10,
        in_channels: int = 1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batch_norm)
        self.stem_bn = nn.BatchNorm2d(widths[0]) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        stages = []
        cin = widths[0]
        for index, width in enumerate(widths):
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                stages.append(BasicBlock(cin, width, stride, batch_norm))
                cin = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@register("resnet_bn")
def resnet_bn(**kwargs: object) -> nn.Module:
    return SmallResNet(batch_norm=True, **kwargs)  # type: ignore[arg-type]


@register("resnet_nobn")
def resnet_nobn(**kwargs: object) -> nn.Module:
    return SmallResNet(batch_norm=False, **kwargs)  # type: ignore[arg-type]


INPUT_SHAPES["resnet_bn"] = (2, 1, 8, 8)
INPUT_SHAPES["resnet_nobn"] = (2, 1, 8, 8)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with a GELU MLP: mostly barriers, by design."""

    def __init__(self, dim: int = 32, heads: int = 4, tokens: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)
        self.heads = heads
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(x.shape[0], self.tokens, 8))
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = q.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)
        k = k.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)
        v = v.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)
        attention = torch.softmax(q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


@register("transformer_block")
def transformer_block(**kwargs: object) -> nn.Module:
    return TransformerBlock(**kwargs)  # type: ignore[arg-type]


INPUT_SHAPES["transformer_block"] = (2, 1, 8, 8)
