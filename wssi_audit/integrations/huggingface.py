"""Hugging Face transformers: `WeightScaleRegularizedTrainer`, a `Trainer` that attaches the regularizer
in one line (``WeightScaleRegularizedTrainer(model=..., args=..., regularizer_strength=2e-3)``).

The documented subclassing point is `Trainer.create_optimizer`: it runs after the optimizer is built
and before the LR scheduler is (so the scheduler covers the new param groups), before
`accelerator.prepare` and before `resume_from_checkpoint` loads the optimizer state (so the saved
groups match). A `TrainerCallback` cannot do this: `on_train_begin` comes after the checkpoint was
loaded. Mix `WeightScaleRegularizationMixin` into your own Trainer subclass (before it in the bases)
to get the same behaviour there. The Trainer steps the optimizer once per accumulated step, after
its gradient clipping (`max_grad_norm`, which does not see the penalty's gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..regularizer import DEFAULT_FORM, DEFAULT_STRENGTH, RegularizerHandle, attach
from ..regularizer.attach import unwrap_optimizer
from . import on_device_of, resolve_module

try:
    from transformers import Trainer
except ImportError as error:
    raise ImportError(
        'wssi_audit.integrations.huggingface needs transformers: pip install "wssi-audit[integrations]"'
    ) from error


class WeightScaleRegularizationMixin:
    """Attach the invariant regularizer to the optimizer `create_optimizer` builds (or was given).

    `regularizer_module`: the submodule to regularize (dotted name; default the whole model).
    `regularizer_example_inputs`: for models FX cannot trace. `regularizer_options`: other keyword
    options of `WeightScaleRegularizer`. The handle is `self.regularizer_handle` after training starts.
    """

    def __init__(
        self,
        *args: Any,
        regularizer_strength: float = DEFAULT_STRENGTH,
        regularizer_form: str = DEFAULT_FORM,
        regularizer_module: str | nn.Module | None = None,
        regularizer_example_inputs: Sequence[Any] | Any = None,
        regularizer_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.regularizer_settings = {
            "strength": regularizer_strength,
            "form": regularizer_form,
            **(regularizer_options or {}),
        }
        self.regularizer_module = regularizer_module
        self.regularizer_example_inputs = regularizer_example_inputs
        self.regularizer_handle: RegularizerHandle | None = None
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        handle = self.regularizer_handle
        if handle is None or handle.removed or handle.optimizer is not unwrap_optimizer(self.optimizer):
            target = resolve_module(self.model, self.regularizer_module)  # type: ignore[attr-defined]
            scheduler = getattr(self, "lr_scheduler", None)  # given through Trainer(optimizers=(opt, sched))
            self.regularizer_handle = attach(
                target,
                self.optimizer,  # type: ignore[attr-defined]
                example_inputs=on_device_of(target, self.regularizer_example_inputs),
                schedulers=[scheduler] if scheduler is not None else [],
                **self.regularizer_settings,
            )
        return optimizer


class WeightScaleRegularizedTrainer(WeightScaleRegularizationMixin, Trainer):
    """`transformers.Trainer` with the invariant regularizer attached (see the module docstring)."""
