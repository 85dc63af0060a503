"""wssi-audit: audit and regularize the weight scales of positively homogeneous networks."""

from ._version import __version__
from .audit import Analysis, analyze, audit
from .regularizer import WeightScaleRegularizer, attach
from .report import Report

__all__ = ["Analysis", "Report", "WeightScaleRegularizer", "__version__", "analyze", "attach", "audit"]
