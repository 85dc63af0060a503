"""Experiments that test the paper's claims on real data (issue #5).

`run_experiments(config)` runs a grid of training runs (datasets x architectures x arms x
regimes x seeds), and writes raw JSON, tables and plots. See docs/results.md.
"""

from .config import ExperimentConfig, default_config, large_config, quick_config
from .runner import run_experiments

__all__ = ["ExperimentConfig", "default_config", "large_config", "quick_config", "run_experiments"]
