"""Lightning: `WeightScaleRegularization`, a Callback that attaches the regularizer to the Trainer's
optimizers in one line (``Trainer(callbacks=[WeightScaleRegularization(strength=2e-3)])``).

It attaches in `on_fit_start`: after Lightning built the optimizers and LR schedulers (which it
passes to `attach`, so a scheduler from `configure_optimizers` follows the new param groups), and
before a checkpoint's optimizer state is restored (so `ckpt_path=` resumes with matching groups).
Lightning steps with `optimizer.step(closure)`; `attach` adds the penalty's gradient after the
closure ran, once per optimizer step (also with `accumulate_grad_batches`), after unscaling under
16-mixed precision, and after Lightning's gradient clipping (which does not see it). Attaching in
`configure_optimizers` directly (``wssi_audit.attach(self, optimizer)``) works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..regularizer import DEFAULT_FORM, DEFAULT_STRENGTH, AttachError, RegularizerHandle, WeightScaleRegularizer, attach
from ..regularizer.attach import unwrap_optimizer
from . import on_device_of, resolve_module

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone `pytorch_lightning` distribution
    try:
        from pytorch_lightning import Callback  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError(
            'wssi_audit.integrations.lightning needs Lightning: pip install "wssi-audit[integrations]"'
        ) from error


class WeightScaleRegularization(Callback):
    """Attach the invariant regularizer to every optimizer of the fit that updates a covered parameter.

    `module`: the submodule to regularize (dotted name or module; default the LightningModule).
    `example_inputs`: for models FX cannot trace (default the module's `example_input_array`).
    Other keyword options go to `WeightScaleRegularizer` (direction_strength, bias_strength, ...).
    """

    def __init__(
        self,
        strength: float = DEFAULT_STRENGTH,
        form: str = DEFAULT_FORM,
        *,
        module: str | nn.Module | None = None,
        example_inputs: Sequence[Any] | Any = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.strength, self.form, self.module = strength, form, module
        self.example_inputs, self.options = example_inputs, options
        self.handles: list[RegularizerHandle] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        target = resolve_module(pl_module, self.module)
        example = self.example_inputs
        if example is None and target is pl_module:
            example = getattr(pl_module, "example_input_array", None)
        settings = {"strength": self.strength, "form": self.form, **self.options}
        first = WeightScaleRegularizer(target, on_device_of(target, example), **settings)
        covered = {id(p) for p in first.covered_parameters()}
        self.handles = []
        for optimizer in trainer.optimizers:
            inner = unwrap_optimizer(optimizer)
            if not any(id(p) in covered for group in inner.param_groups for p in group["params"]):
                continue
            schedulers = [
                config.scheduler
                for config in trainer.lr_scheduler_configs
                if unwrap_optimizer(config.scheduler.optimizer) is inner
            ]
            # One regularizer per optimizer (each only feeds the parameters its optimizer updates).
            reg = (
                first if not self.handles else WeightScaleRegularizer.from_analysis(first.analysis, target, **settings)
            )
            self.handles.append(attach(target, inner, regularizer=reg, schedulers=schedulers))
        if not self.handles:
            raise AttachError(
                f"no optimizer of this Trainer updates any of the {len(covered)} parameters the regularizer covers"
            )
