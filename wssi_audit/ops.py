"""The op table: what every canonical op means for weight-scale-shift analysis.

Front-ends translate their own op names (FX modules and functions, ATen overloads,
ONNX op types) into the canonical names below; analyses only ever look here.
Extending support for an op is one row in a front-end table plus, if the op is
new, one row here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import InputError


class Role(str, Enum):
    """How an op takes part in positive homogeneity."""

    WEIGHT = "weight"  # linear map with a weight tensor (and optional bias)
    HOMOGENEOUS = "homogeneous"  # degree-1 in its single activation input
    JOIN = "join"  # degree-1 in all activation inputs jointly (add, sub, cat)
    BATCH_NORM = "batch_norm"  # affine per channel in eval mode: folded into its producer
    BARRIER = "barrier"  # breaks homogeneity
    STRUCTURAL = "structural"  # graph inputs, outputs, shape arithmetic: not an op on activations


class Status(str, Enum):
    """The status every graph node is reported with."""

    WEIGHT = "weight"
    HOMOGENEOUS = "homogeneous"
    BARRIER = "barrier"
    UNKNOWN = "unknown"
    STRUCTURAL = "structural"


Lipschitz = float | Callable[[dict[str, Any]], float | None] | None


@dataclass(frozen=True)
class OpSpec:
    role: Role
    reason: str = ""
    # Upper bound on the op's Lipschitz constant (l2 -> l2), from its attrs; None = unknown.
    lipschitz: Lipschitz = None
    # Draws random numbers at every run (dropout in training mode): two runs of the graph differ.
    random: bool = False

    def lipschitz_of(self, attrs: dict[str, Any]) -> float | None:
        if callable(self.lipschitz):
            return self.lipschitz(attrs)
        return self.lipschitz


def overlap_factor(kernel: Any, stride: Any = None, dilation: Any = 1) -> float:
    """sqrt(most windows that read one input position): a sliding-window map (convolution,
    pooling) has l2 operator norm at most this times its per-window norm. sqrt(prod ceil(k/s));
    sqrt(prod k) with dilation."""
    kernel = [int(k) for k in _as_list(kernel)]
    stride = [int(s) for s in _as_list(stride)] if stride else kernel
    if len(stride) == 1 and len(kernel) > 1:
        stride = stride * len(kernel)
    if any(s < 1 for s in stride):
        raise InputError(f"a sliding window with stride {stride}: not a layer torch can run")
    if any(int(d) != 1 for d in _as_list(1 if dilation is None else dilation)):
        return math.sqrt(math.prod(kernel))
    return math.sqrt(math.prod(math.ceil(k / s) for k, s in zip(kernel, stride)))


def _pool_lipschitz(attrs: dict[str, Any]) -> float | None:
    """Max/avg pooling: ||J|| <= sqrt(max windows covering one input)."""
    if attrs.get("kernel_size") is None:
        return None
    return overlap_factor(attrs["kernel_size"], attrs.get("stride"), attrs.get("dilation"))


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _leaky_lipschitz(attrs: dict[str, Any]) -> float:
    return max(1.0, abs(float(attrs.get("negative_slope", 0.01))))


def _scale_lipschitz(attrs: dict[str, Any]) -> float | None:
    factor = attrs.get("factor")
    return None if factor is None else abs(float(factor))


def _upsample_lipschitz(attrs: dict[str, Any]) -> float | None:
    if attrs.get("mode", "nearest") != "nearest":
        return None
    factor = attrs.get("scale_factor")
    if factor is None:
        return None
    return math.sqrt(math.prod(float(f) for f in _as_list(factor)))


def _pad_lipschitz(attrs: dict[str, Any]) -> float | None:
    """Zero padding adds zeros (1). Reflect and circular padding by less than the size copy an
    entry at most 3 times per padded dimension, replicate padding an edge entry 1 + pads times."""
    mode = attrs.get("mode") or "constant"
    pads = [int(p) for p in _as_list(attrs.get("pad") or attrs.get("padding") or [])]
    if mode in ("constant", "zeros"):
        return 1.0
    if not pads:
        return None
    pairs = [pads[i : i + 2] for i in range(0, len(pads) - 1, 2)]
    if mode in ("reflect", "circular"):
        copies = [3 if any(pair) else 1 for pair in pairs]
    elif mode == "replicate":
        copies = [1 + sum(pair) for pair in pairs]
    else:
        return None
    return math.sqrt(math.prod(copies))


def _vector_norm_lipschitz(attrs: dict[str, Any]) -> float | None:
    """The l2 norm over some dimensions is 1-Lipschitz; other orders are not bounded here."""
    return 1.0 if attrs.get("ord", 2) in (2, 2.0) else None


def _barrier(reason: str, lipschitz: Lipschitz = None) -> OpSpec:
    return OpSpec(Role.BARRIER, reason, lipschitz)


_NOT_HOMOGENEOUS = "activation is not positively homogeneous"

OP_TABLE: dict[str, OpSpec] = {
    # weight layers
    "linear": OpSpec(Role.WEIGHT),
    "conv": OpSpec(Role.WEIGHT),
    "conv_transpose": OpSpec(Role.WEIGHT),
    # degree-1 unary ops
    "relu": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "leaky_relu": OpSpec(Role.HOMOGENEOUS, lipschitz=_leaky_lipschitz),
    "prelu": OpSpec(Role.HOMOGENEOUS, lipschitz=None),
    "max_pool": OpSpec(Role.HOMOGENEOUS, lipschitz=_pool_lipschitz),
    "avg_pool": OpSpec(Role.HOMOGENEOUS, lipschitz=_pool_lipschitz),
    # Exact constants need the input size (analysis/pool_norms); an upsampling adaptive pool
    # (VGG's 7 x 7 pool after a 1 x 1 map) copies each input to many outputs: no size-free constant.
    "adaptive_avg_pool": OpSpec(Role.HOMOGENEOUS, lipschitz=None),
    "adaptive_max_pool": OpSpec(Role.HOMOGENEOUS, lipschitz=None),
    "global_avg_pool": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "mean": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "sum": OpSpec(Role.HOMOGENEOUS, lipschitz=None),
    "max_reduce": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "flatten": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "reshape": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "slice": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "split": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "expand": OpSpec(Role.HOMOGENEOUS, lipschitz=None),
    "dropout": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "identity": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "neg": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),
    "pad": OpSpec(Role.HOMOGENEOUS, lipschitz=_pad_lipschitz),
    "permute": OpSpec(Role.HOMOGENEOUS, lipschitz=1.0),  # reorders entries: permute, transpose, roll
    "vector_norm": OpSpec(Role.HOMOGENEOUS, lipschitz=_vector_norm_lipschitz),  # ||t x|| = t ||x||, t > 0
    "upsample": OpSpec(Role.HOMOGENEOUS, lipschitz=_upsample_lipschitz),
    "scale": OpSpec(Role.HOMOGENEOUS, lipschitz=_scale_lipschitz),
    "scale_param": OpSpec(Role.HOMOGENEOUS, lipschitz=None),
    # a conv / linear whose weight is a fixed buffer (a blur filter): degree 1, not a shiftable
    # layer; the front-end bounds its operator norm from the buffer's values
    "fixed_filter": OpSpec(Role.HOMOGENEOUS, lipschitz=lambda attrs: attrs.get("lipschitz")),
    # joins
    "add": OpSpec(Role.JOIN),
    "sub": OpSpec(Role.JOIN),
    "cat": OpSpec(Role.JOIN),
    # normalization
    "batch_norm": OpSpec(Role.BATCH_NORM),
    # barriers
    "gelu": _barrier(_NOT_HOMOGENEOUS + " (GELU)", 1.13),
    "silu": _barrier(_NOT_HOMOGENEOUS + " (SiLU/Swish)", 1.1),
    "elu": _barrier(_NOT_HOMOGENEOUS + " (ELU)", lambda a: max(1.0, float(a.get("alpha", 1.0)))),
    "selu": _barrier(_NOT_HOMOGENEOUS + " (SELU)", 1.0507 * 1.6733),
    "celu": _barrier(_NOT_HOMOGENEOUS + " (CELU)", 1.0),
    "softplus": _barrier(_NOT_HOMOGENEOUS + " (Softplus)", 1.0),
    "mish": _barrier(_NOT_HOMOGENEOUS + " (Mish)", 1.1),
    "tanh": _barrier(_NOT_HOMOGENEOUS + " (Tanh)", 1.0),
    "sigmoid": _barrier(_NOT_HOMOGENEOUS + " (Sigmoid)", 0.25),
    "hardswish": _barrier(_NOT_HOMOGENEOUS + " (Hardswish)", 1.5),
    "hardsigmoid": _barrier(_NOT_HOMOGENEOUS + " (Hardsigmoid)", 1.0 / 6.0),
    "relu6": _barrier("clipping at 6 is not positively homogeneous (ReLU6)", 1.0),
    "hardtanh": _barrier("clipping is not positively homogeneous (Hardtanh)", 1.0),
    "clamp": _barrier("clipping is not positively homogeneous (clamp)", 1.0),
    "softmax": _barrier("softmax is invariant to shifts, not homogeneous", 1.0),
    "log_softmax": _barrier("log-softmax is not homogeneous"),
    "layer_norm": _barrier("normalization is degree 0 in its input scale (LayerNorm)"),
    "group_norm": _barrier("normalization is degree 0 in its input scale (GroupNorm)"),
    "instance_norm": _barrier("normalization is degree 0 in its input scale (InstanceNorm)"),
    "rms_norm": _barrier("normalization is degree 0 in its input scale (RMSNorm)"),
    "normalize": _barrier("normalization is degree 0 in its input scale (F.normalize)"),
    "batch_norm_train": _barrier("BatchNorm in training mode is degree 0 in its input scale"),
    "dropout_train": OpSpec(
        Role.BARRIER,
        "dropout in training mode draws a new random mask at every run (export the model in eval mode)",
        lambda attrs: 1.0 / (1.0 - float(attrs.get("p", 0.5))) if float(attrs.get("p", 0.5)) < 1 else None,
        random=True,
    ),
    "batch_norm_unfoldable": _barrier("BatchNorm without a weight layer before it is an affine offset"),
    "mul": _barrier("product of two activations (gating or attention)"),
    "addcmul": _barrier("elementwise scale by a tensor plus an offset (addcmul)"),
    "side_output": _barrier("statistics or indices output of a multi-output op, not its activation"),
    "div": _barrier("division by an activation"),
    "matmul": _barrier("product of two activations (attention)"),
    "attention": _barrier("attention is not positively homogeneous"),
    "add_const": _barrier("adds a constant offset", 1.0),  # an offset moves no gradient
    "embedding": _barrier("embedding lookup: the input is an index, not an activation"),
    "pointwise": _barrier("non-homogeneous elementwise function"),
    "tied_weight": _barrier("tied weight: one tensor used by several layers"),
    "opaque_module": OpSpec(Role.BARRIER, "submodule could not be traced"),
    # structure
    "input": OpSpec(Role.STRUCTURAL),
    "output": OpSpec(Role.STRUCTURAL),
    "shape": OpSpec(Role.STRUCTURAL),
    "constant": OpSpec(Role.STRUCTURAL),
}

# A few barriers are "unknown" rather than known barriers: the analysis did not look inside.
UNKNOWN_OPS = frozenset({"opaque_module"})


def spec_of(op: str) -> OpSpec | None:
    """The table row of a canonical op, or None for an op nobody has classified."""
    return OP_TABLE.get(op)
