"""wssi-audit: audit and regularize the weight scales of positively homogeneous networks.

The API's names are imported on first use (PEP 562): `import wssi_audit`, `wssi-audit --help` and
`--version` do not pay the seconds that importing torch and torch.export's loader take.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .auditing import Analysis, analyze, audit
    from .regularizer import WeightScaleRegularizer, attach
    from .report import Report

# name -> the module that defines it
_ORIGINS = {
    "Analysis": ".auditing",
    "analyze": ".auditing",
    "audit": ".auditing",
    "Report": ".report",
    "WeightScaleRegularizer": ".regularizer",
    "attach": ".regularizer",
}

__all__ = ["Analysis", "Report", "WeightScaleRegularizer", "__version__", "analyze", "attach", "audit"]


def __getattr__(name: str) -> Any:
    origin = _ORIGINS.get(name)
    if origin is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(origin, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ORIGINS})
