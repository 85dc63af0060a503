"""What the installed torch can do: the few conversions that older releases within
pyproject's floor (torch >= 2.4) cannot, each refused up front with one line naming the
release it needs, instead of a torch traceback or a stray file.

Measured with this package's tests, each release with the newest onnx / onnxscript that pip
resolves beside it: converting TorchScript fails on 2.4.1 (works from 2.5.1); exporting a
torch.export program to ONNX fails on 2.4.1, 2.5.1 and 2.6.0 (works from 2.7.1; 2.4.1 also
leaves a report_dynamo_export.sarif in the working directory). Nothing else differs: the
front-ends read every graph form these releases emit.
"""

from __future__ import annotations

import re

import torch

from ..errors import InputError

# feature -> (first torch release where it works, what the user asked for)
NEEDS: dict[str, tuple[tuple[int, int], str]] = {
    "torchscript": ((2, 5), "converting a TorchScript archive to a torch.export program"),
    "onnx_from_program": ((2, 7), "exporting a torch.export program (.pt2) to ONNX"),
}


def torch_release(version: str = torch.__version__) -> tuple[int, int]:
    """'2.4.1+cu121' -> (2, 4)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"unrecognised torch version '{version}'")
    return int(match.group(1)), int(match.group(2))


def supports(feature: str, version: str = torch.__version__) -> bool:
    return torch_release(version) >= NEEDS[feature][0]


def require(feature: str, instead: str, version: str = torch.__version__) -> None:
    """Raise InputError (exit 2) when the installed torch is older than `feature` needs."""
    if supports(feature, version):
        return
    (major, minor), what = NEEDS[feature]
    raise InputError(f"{what} needs torch >= {major}.{minor} (installed: {version}); {instead}")
