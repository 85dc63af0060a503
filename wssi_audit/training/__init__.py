"""Fine-tuning with the invariant regularizer (`wssi-audit finetune`)."""

from .data import load_dataset, split_dataset
from .finetune import FinetuneResult, TrainingDiverged, run_finetune

__all__ = ["FinetuneResult", "TrainingDiverged", "load_dataset", "run_finetune", "split_dataset"]
