"""Effective (BatchNorm-folded) weights, and writing a scale shift back into real tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..ir import all_finite
from .structure import WeightLayer

Tensors = Mapping[str, torch.Tensor]
EffectiveWeight = tuple[torch.Tensor, torch.Tensor | None]


def _bn_scale(layer: WeightLayer, tensors: Tensors) -> torch.Tensor:
    """gamma / sqrt(var + eps): the folded BatchNorm's per-channel scale."""
    bn = layer.bn
    assert bn is not None
    gamma = tensors[bn.weight].double()
    var = tensors[bn.running_var].double()
    return gamma / torch.sqrt(var + bn.eps)


def fold_is_finite(layer: WeightLayer, tensors: Tensors) -> bool:
    """False when the BatchNorm folded into the layer scales by NaN or Inf: an eps that is NaN or
    leaves var + eps <= 0, though every tensor is finite."""
    return layer.bn is None or all_finite(_bn_scale(layer, tensors))


def _scale_out_channels(layer: WeightLayer, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diag(scale) applied on the output channels of a weight of any layer kind."""
    if layer.op != "conv_transpose":
        return weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    groups = int(layer.attrs.get("groups", 1) or 1)
    in_channels, out_per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *weight.shape[2:])
    grouped = grouped * scale.view(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
    return grouped.reshape(weight.shape)


def out_channels(layer: WeightLayer, weight: torch.Tensor) -> int:
    if layer.op == "conv_transpose":
        return weight.shape[1] * int(layer.attrs.get("groups", 1) or 1)
    return weight.shape[0]


def effective_weight(layer: WeightLayer, tensors: Tensors) -> EffectiveWeight:
    """(W_eff, b_eff) in float64: the layer's map with its eval-mode BatchNorm folded in."""
    weight = tensors[layer.weight].detach().double()
    bias = tensors[layer.bias].detach().double() if layer.bias else None
    if layer.bn is None:
        return weight, bias
    bn = layer.bn
    scale = _bn_scale(layer, tensors)
    mean = tensors[bn.running_mean].double()
    beta = tensors[bn.bias].double()
    conv_bias = bias if bias is not None else torch.zeros_like(mean)
    return _scale_out_channels(layer, weight, scale), scale * (conv_bias - mean) + beta


def shift_layers(
    layers: list[WeightLayer],
    log10_factors: list[float],
    tensors: Tensors,
    *,
    log10_input_scale: float = 0.0,
    log10_output_scale: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Tensors realising the weight scale shift W_l -> g_l W_l, b_l -> c_l b_l (science.md s.1).

    `log10_factors` must sum to zero (prod g_l = 1); the cumulative factor of the last layer
    is set to exactly 1. Folded layers are shifted through their BatchNorm's gamma and beta,
    so the real module computes the shifted effective map. Layers a layer carries
    (`WeightLayer.carried`: parallel layers before the next one) keep their weight and scale
    their bias by that layer's cumulative factor. Returns state_dict key -> float64
    tensor (cast before writing into a model).

    For a chain whose input is already scaled by 10^in and whose output must come out scaled
    by 10^out (rebalancing a residual stream), pass `log10_input_scale` / `log10_output_scale`:
    then c_l = 10^(in + sum_{k<=l} log g_k), the factors must sum to out - in, and the last
    layer's c is exactly 10^out.
    """
    overrides: dict[str, torch.Tensor] = {}
    cumulative = log10_input_scale
    for index, (layer, log_g) in enumerate(zip(layers, log10_factors)):
        cumulative += log_g
        g = 10.0**log_g
        c = 10.0**log10_output_scale if index == len(layers) - 1 else 10.0**cumulative
        for rider in layer.carried:  # weight unchanged, input and output both scaled by this c
            scale = {"log10_input_scale": cumulative, "log10_output_scale": cumulative}
            overrides.update(shift_layers([rider], [0.0], tensors, **scale))
        if layer.bn is None:
            overrides[layer.weight] = tensors[layer.weight].double() * g
            if layer.bias:
                overrides[layer.bias] = tensors[layer.bias].double() * c
            continue
        bn = layer.bn
        scale = _bn_scale(layer, tensors)
        mean = tensors[bn.running_mean].double()
        conv_bias = tensors[layer.bias].double() if layer.bias else torch.zeros_like(mean)
        beta = tensors[bn.bias].double()
        overrides[bn.weight] = tensors[bn.weight].double() * g
        new_beta = (c - g) * scale * (conv_bias - mean) + c * beta
        overrides[bn.bias] = new_beta
    return overrides


def layer_tensor_keys(layer: WeightLayer) -> list[str]:
    """Every tensor a layer's effective map reads: weight, bias, and its folded BatchNorm's."""
    keys = [layer.weight, *([layer.bias] if layer.bias else [])]
    if layer.bn is not None:
        keys += [layer.bn.weight, layer.bn.bias, layer.bn.running_mean, layer.bn.running_var]
    return keys


def chain_tensor_keys(layers: list[WeightLayer]) -> list[str]:
    return [key for layer in layers for key in layer_tensor_keys(layer)]
