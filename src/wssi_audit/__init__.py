"""wssi-audit: audit and regularize the weight scales of positively homogeneous networks."""

from ._version import __version__
from .audit import Analysis, analyze, audit
from .report import Report

__all__ = ["Analysis", "Report", "__version__", "analyze", "audit"]
