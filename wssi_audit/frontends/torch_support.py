"""The oldest torch this package runs on, checked before any model file is read.

pyproject claims torch >= 2.9, the release `make test-oldest` runs the whole suite on (CI runs it
there and on the newest, 2.14.1). Measured on older releases, each with the newest onnx /
onnxscript pip resolves beside it: every .pt2 fails below 2.9 (the archive scan reads
torch.export.pt2_archive's layout constants: the module is new in 2.8, and 2.8 lacks the weights
and constants config files), TorchScript conversion fails on 2.4.1 (works from 2.5.1), exporting a
.pt2 to ONNX fails on 2.4.1, 2.5.1 and 2.6.0 (works from 2.7.1). So an older torch, installed
despite the requirement, gets one line (exit 2) instead of a torch traceback or an internal error.

The front-ends also read the graph forms older releases emit (torch 2.4's tuple-returning
BatchNorm, core ATen IR on every release): tests/test_frontend_forms.py.
"""

from __future__ import annotations

import re

import torch

from ..errors import InputError

FLOOR = (2, 9)


def torch_release(version: str | None = None) -> tuple[int, int]:
    """'2.9.0+cu128' -> (2, 9); the installed torch by default."""
    version = version or torch.__version__
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"unrecognised torch version '{version}'")
    return int(match.group(1)), int(match.group(2))


def require_supported_torch(version: str | None = None) -> None:
    """Raise InputError (exit 2) when the installed torch is older than the floor."""
    version = version or torch.__version__
    if torch_release(version) < FLOOR:
        major, minor = FLOOR
        raise InputError(
            f"wssi-audit needs torch >= {major}.{minor} (installed: {version}): pip install 'torch>={major}.{minor}'"
        )
