"""`attach`: the one mechanism that applies the penalty inside an optimizer's step, in every loop.

A step pre-hook on the (unwrapped) torch optimizer adds the penalty's gradient once per `step()`:

* `step()` without a closure (plain loops, HF Trainer, accelerate, GradScaler): right before the
  update, i.e. after all backward passes of an accumulated step, after DDP's all-reduce and after
  `GradScaler.unscale_`. Where the gradients are still scaled (a fused optimizer that unscales inside
  its kernel: `optimizer.grad_scale` is set), the penalty's gradient is scaled the same way.
* `step(closure)` (Lightning, LBFGS): the closure zeroes and recomputes the gradients, so the hook
  wraps it and adds the penalty's gradient after each closure run; the closure's loss is returned
  with the penalty's value added (the objective whose gradient it is).

Covered parameters leave any group with weight decay for new groups with `weight_decay=0`; LR
schedulers built before `attach` are given to it (`schedulers=`) so their per-group lists grow with
the groups. Where attach cannot act (FSDP, nothing covered, an optimizer that updates nothing
covered, an unknown scheduler list, ZeroRedundancyOptimizer) it raises `AttachError` instead of
running without effect. Trainer integrations (Lightning, Hugging Face) are thin adapters over it, in
`wssi_audit.integrations`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .coverage import Coverage
from .penalty import DEFAULT_FORM, DEFAULT_STRENGTH, WeightScaleRegularizer, refuse_sharded


class AttachError(ValueError):
    """`attach` cannot make the penalty act in this optimizer; the message says why and what to do."""


class DecoupledWeightDecayWarning(UserWarning):
    """Covered parameters had decoupled weight decay (AdamW): the penalty's gradient replaces it."""


# Attributes through which trainer wrappers hold the real torch optimizer / scheduler:
# lightning's LightningOptimizer (_optimizer), accelerate's AcceleratedOptimizer (optimizer) and
# AcceleratedScheduler (scheduler).
OPTIMIZER_WRAPPER_ATTRIBUTES = ("_optimizer", "optimizer")
SCHEDULER_WRAPPER_ATTRIBUTES = ("scheduler",)
# Per-group lists that torch's LR schedulers keep (one entry per param group, in group order).
SCHEDULER_GROUP_LISTS = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
)
# Scheduler list attributes that are not per group (so a matching length is a coincidence).
SCHEDULER_OTHER_LISTS = ("_schedulers", "_milestones", "_schedule_phases")
# Optimizers whose param groups attach cannot extend, with the reason.
REFUSED_OPTIMIZERS = {
    "ZeroRedundancyOptimizer": "it partitions its parameter groups across ranks when it is built",
}


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind trainer wrappers (LightningOptimizer, AcceleratedOptimizer)."""
    seen = {id(optimizer)}
    while "_optimizer_step_pre_hooks" not in vars(optimizer):
        inner = next(
            (
                getattr(optimizer, name)
                for name in OPTIMIZER_WRAPPER_ATTRIBUTES
                if isinstance(vars(optimizer).get(name), torch.optim.Optimizer)
            ),
            None,
        )
        if inner is None or id(inner) in seen:
            raise AttachError(
                f"{type(optimizer).__name__} is not a torch optimizer attach can hook (it has no step hooks and "
                "wraps no torch.optim.Optimizer): attach the optimizer it wraps"
            )
        seen.add(id(inner))
        optimizer = inner
    return optimizer


def unwrap_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler behind a wrapper (accelerate's AcceleratedScheduler)."""
    while not hasattr(scheduler, "optimizer") or not isinstance(scheduler.optimizer, torch.optim.Optimizer):
        inner = next((vars(scheduler)[a] for a in SCHEDULER_WRAPPER_ATTRIBUTES if a in vars(scheduler)), None)
        if inner is None:
            raise AttachError(f"{type(scheduler).__name__} is not an LR scheduler of a torch optimizer")
        scheduler = inner
    return scheduler


def _scheduler_tree(scheduler: Any) -> list[Any]:
    """A scheduler and the ones it chains (SequentialLR, ChainedScheduler)."""
    children = getattr(scheduler, "_schedulers", None) or []
    return [scheduler] + [s for child in children for s in _scheduler_tree(child)]


@dataclass
class _GrownScheduler:
    scheduler: Any
    attribute: str
    added: int


def _grow_schedulers(schedulers: Iterable[Any], optimizer: torch.optim.Optimizer, sources: list[int]) -> list[Any]:
    """Extend every per-group list of `schedulers` with the entries of each new group's source group.

    Raises before changing anything when a scheduler belongs to another optimizer or keeps a
    per-group list attach does not know (it would silently run the new groups on a stale value)."""
    old = len(optimizer.param_groups) - len(sources)
    plan: list[tuple[Any, str]] = []
    for top in schedulers:
        for scheduler in _scheduler_tree(unwrap_scheduler(top)):
            if unwrap_optimizer(scheduler.optimizer) is not optimizer:
                raise AttachError(f"{type(scheduler).__name__} belongs to another optimizer than the one attached")
            state = vars(scheduler)
            for name, value in state.items():
                if not isinstance(value, list) or len(value) != old or name in SCHEDULER_OTHER_LISTS:
                    continue
                if name not in SCHEDULER_GROUP_LISTS:
                    raise AttachError(
                        f"{type(scheduler).__name__} keeps a per-group list '{name}' attach cannot extend: "
                        "build the scheduler after attach"
                    )
                plan.append((scheduler, name))
    grown = []
    for scheduler, name in plan:
        values = getattr(scheduler, name)
        values.extend(values[i] for i in sources)
        grown.append(_GrownScheduler(scheduler, name, len(sources)))
    return grown


@dataclass
class RegularizerHandle:
    """Returned by `attach`; `.remove()` restores the optimizer's groups, the schedulers' per-group
    lists and removes the hook."""

    regularizer: WeightScaleRegularizer
    optimizer: torch.optim.Optimizer
    _hook: Any
    _moved: list[tuple[dict[str, Any], list[Any], dict[str, Any]]]  # (source group, its old params, new group)
    _grown: list[Any] = field(default_factory=list)
    removed: bool = False
    steps: int = 0  # optimizer steps (closure runs) at which the penalty's gradient was added

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
        for grown in self._grown:
            del getattr(grown.scheduler, grown.attribute)[-grown.added :]
        self.removed = True


def _has_scheduler(optimizer: torch.optim.Optimizer) -> bool:
    """torch's LRScheduler marks the optimizer's `step` it wraps when it is built."""
    return hasattr(optimizer.step, "_wrapped_by_lr_sched")


def _decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def _move_covered(
    optimizer: torch.optim.Optimizer, covered: set[int]
) -> tuple[list[tuple[dict[str, Any], list[Any], dict[str, Any]]], list[int], int]:
    """Covered parameters of groups with weight decay move to copies of those groups with decay 0.
    Returns (moves, source group index of each new group, covered parameters that had decoupled decay)."""
    moved, sources, decoupled = [], [], 0
    for index, group in enumerate(list(optimizer.param_groups)):
        taken = [p for p in group["params"] if id(p) in covered]
        if not taken or not group.get("weight_decay"):
            continue
        decoupled += len(taken) if _decoupled(optimizer, group) else 0
        old = list(group["params"])
        new_group = {k: v for k, v in group.items() if k != "params"}
        new_group["weight_decay"] = 0.0
        new_group["params"] = taken
        group["params"] = [p for p in old if id(p) not in covered]
        optimizer.param_groups.append(new_group)
        moved.append((group, old, new_group))
        sources.append(index)
    return moved, sources, decoupled


def _closure_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any] | None:
    """The closure passed to `step` (args[0] is the optimizer itself)."""
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    return closure if callable(closure) else None


def attach(
    model: nn.Module,
    optimizer: Any,
    strength: float = DEFAULT_STRENGTH,
    form: str = DEFAULT_FORM,
    *,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    regularizer: WeightScaleRegularizer | None = None,
    schedulers: Sequence[Any] = (),
    **options: Any,
) -> RegularizerHandle:
    """Regularize `model` invariantly inside `optimizer` (a torch optimizer, or Lightning's /
    accelerate's wrapper of one); see the module docstring for when the gradient is added.

    Covered parameters in groups with weight decay move to new groups with weight_decay 0 (copies of
    their old groups' other settings); LR schedulers already built on the optimizer must be passed
    in `schedulers` (they are extended to the new groups). For AdamW the covered parameters'
    decoupled decay is replaced by the penalty's gradient, which AdamW adapts like any gradient (a
    `DecoupledWeightDecayWarning` says so). Gradient clipping done before `step()` does not see the
    penalty's gradient. Raises `AttachError` where it cannot act, `ShardedModelError` for FSDP.
    """
    refuse_sharded(model)
    torch_optimizer = unwrap_optimizer(optimizer)
    refused = REFUSED_OPTIMIZERS.get(type(torch_optimizer).__name__)
    if refused:
        raise AttachError(f"attach cannot extend {type(torch_optimizer).__name__}: {refused}")
    reg = regularizer or WeightScaleRegularizer(model, example_inputs, strength=strength, form=form, **options)
    covered_params = reg.covered_parameters()
    if not covered_params:
        excluded = reg.coverage().excluded
        first = f"; first: {excluded[0].key}: {excluded[0].reason}" if excluded else ""
        raise AttachError(
            f"nothing to regularize: no layer of this model is covered ({len(excluded)} weights excluded{first}); "
            "WeightScaleRegularizer(model).coverage() lists why"
        )
    updated = [p for group in torch_optimizer.param_groups for p in group["params"]]
    updated_ids = {id(p) for p in updated}
    if not any(id(p) in updated_ids for p in covered_params):
        raise AttachError(
            f"the optimizer updates none of the {len(covered_params)} parameters the regularizer covers "
            "(was it built over another copy of the model, or over FSDP's flattened parameters?)"
        )
    # Only parameters this optimizer updates (and zeroes) receive the penalty's gradient.
    reg.restrict_gradients_to(updated)
    covered = {id(p) for p in covered_params}
    had_scheduler = _has_scheduler(torch_optimizer)
    moved, sources, decoupled = _move_covered(torch_optimizer, covered)
    try:
        if moved and had_scheduler and not schedulers:
            raise AttachError(
                "an LR scheduler was built on this optimizer before attach, and attach adds param groups: "
                "build the scheduler after attach, or pass it: attach(..., schedulers=[scheduler])"
            )
        grown = _grow_schedulers(schedulers, torch_optimizer, sources) if moved else []
    except Exception:
        RegularizerHandle(reg, torch_optimizer, _NoHook(), moved).remove()
        raise
    if decoupled:
        warnings.warn(
            f"{type(torch_optimizer).__name__}'s decoupled weight decay on the parameters the regularizer covers "
            "is replaced by the penalty's gradient, which the optimizer adapts like any gradient (coupled, as "
            "an L2 term in Adam); uncovered parameters keep their decoupled decay",
            DecoupledWeightDecayWarning,
            stacklevel=2,
        )
    handle = RegularizerHandle(reg, torch_optimizer, None, moved, grown)

    def apply(opt: torch.optim.Optimizer) -> torch.Tensor:
        # A fused optimizer stepped by GradScaler unscales inside its kernel: grads are still scaled here.
        handle.steps += 1
        return reg.add_gradients_(getattr(opt, "grad_scale", None))

    def hook(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        closure = _closure_of(args, kwargs)
        if closure is None:
            apply(opt)
            return None

        def closure_then_penalty() -> Any:
            loss = closure()
            value = apply(opt)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                return loss + value.to(loss.device, loss.dtype)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_penalty}
        return (args[0], closure_then_penalty, *args[2:]), kwargs

    handle._hook = torch_optimizer.register_step_pre_hook(hook)
    return handle


class _NoHook:
    def remove(self) -> None:
        pass
