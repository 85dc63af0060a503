"""Golden reports: each example script's model, audited, must match tests/golden/<name>.json.

Regenerate after an intended change with:  UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wssi_audit import audit

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = ["mlp", "cnn", "resnet_nobn", "resnet_bn", "transformer_block"]
VOLATILE = {("tool", "version"), ("model", "source"), ("summary", "max_verification_error")}


def _compare(expected, actual, path=()):
    if path[-2:] in VOLATILE or path[:2] in VOLATILE:
        return
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        assert math.isclose(expected, actual, rel_tol=1e-5, abs_tol=1e-9), (path, expected, actual)
    elif isinstance(expected, dict):
        assert set(expected) == set(actual), (path, set(expected) ^ set(actual))
        for key in expected:
            _compare(expected[key], actual[key], (*path, key))
    elif isinstance(expected, list):
        assert len(expected) == len(actual), (path, len(expected), len(actual))
        for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
            _compare(a, b, (*path, index))
    else:
        assert expected == actual, (path, expected, actual)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_report_matches_golden(name, tmp_path):
    target = tmp_path / f"{name}.pt2"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), str(target)], check=True, cwd=ROOT / "examples"
    )
    document = audit(target).to_dict()
    assert document["summary"]["all_verified"] is True
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1" or not golden.exists():
        golden.write_text(json.dumps(document, indent=2) + "\n")
        if os.environ.get("UPDATE_GOLDEN") != "1":
            pytest.fail(f"{golden.name} did not exist; written now, review and commit it")
    _compare(json.loads(golden.read_text()), document)
