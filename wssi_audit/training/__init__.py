"""Fine-tuning with the invariant regularizer (`wssi-audit finetune`), on one process or under torchrun."""

from .data import digits_split, load_data
from .finetune import FinetuneResult, TrainingDiverged, run_finetune

__all__ = ["FinetuneResult", "TrainingDiverged", "digits_split", "load_data", "run_finetune"]
