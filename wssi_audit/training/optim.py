"""Optimizers, learning-rate schedules and mixed precision for `finetune`, as tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import InputError

OPTIMIZERS: dict[str, Callable[[Iterable[Any], float, float, float], torch.optim.Optimizer]] = {
    # (params, lr, momentum, weight_decay); AdamW's decay is decoupled, and momentum does not apply to it.
    "sgd": lambda params, lr, momentum, wd: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
    "adamw": lambda params, lr, _momentum, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
}


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# Multiplier of the base learning rate after the warm-up, as a function of progress in [0, 1].
SCHEDULES: dict[str, Callable[[float], float]] = {"constant": _constant, "cosine": _cosine}
# Autocast dtypes; "auto" is bf16 on CUDA where supported, else fp16 (with a GradScaler), off on CPU.
AMP_MODES = ("auto", "bf16", "fp16", "off")


def build_optimizer(
    name: str, params: Iterable[Any], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise InputError(f"bad --optimizer '{name}': choose {' or '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr, momentum, weight_decay)


class WarmupSchedule:
    """LR multiplier at optimizer step `step` (0-based): linear warm-up over `warmup` steps from
    1/(warmup+1) to 1, then the schedule over the remaining steps (cosine ends at 0)."""

    def __init__(self, kind: str, total: int, warmup: int) -> None:
        # Plain values only: LambdaLR's state_dict saves them, and checkpoints load with weights_only.
        self.kind, self.total, self.warmup = kind, total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return SCHEDULES[self.kind](min(1.0, (step - self.warmup) / max(1, self.total - self.warmup)))


def build_schedule(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR; build it after `attach` (which adds param groups)."""
    if kind not in SCHEDULES:
        raise InputError(f"bad --schedule '{kind}': choose {' or '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise InputError("--warmup-steps must be >= 0")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(kind, total_steps, warmup_steps))


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on this device (None: full precision); fp16 needs CUDA."""
    if mode not in AMP_MODES:
        raise InputError(f"bad --amp '{mode}': choose {', '.join(AMP_MODES)}")
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs CUDA (float16 autocast with a gradient scaler): use --amp bf16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]
