"""The torch releases the package claims (pyproject: torch >= 2.9) are the ones CI tests: the
whole suite runs on the floor (`make test-oldest`, torch 2.9.0) and on the newest (2.14.1). An
older torch gets one line naming the floor, never an internal error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import example_model
from wssi_audit.cli import app
from wssi_audit.errors import InputError
from wssi_audit.frontends import torch_support
from wssi_audit.frontends.torch_support import FLOOR, require_supported_torch, torch_release

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_releases_are_read_from_version_strings() -> None:
    assert torch_release("2.4.1+cu121") == (2, 4)
    assert torch_release("2.14.1") == (2, 14)  # compared as numbers: 2.14 is newer than 2.9
    assert torch_release("2.10.0a0+git1234") == (2, 10)


def test_an_older_torch_gets_one_line_naming_the_floor() -> None:
    with pytest.raises(InputError, match=r"needs torch >= 2\.9 \(installed: 2\.8\.0\)"):
        require_supported_torch("2.8.0")
    require_supported_torch("2.9.0")  # the floor itself is enough
    require_supported_torch(torch.__version__)  # and so is the torch running this suite


def test_the_cli_refuses_an_older_torch_with_exit_2(tmp_path, monkeypatch) -> None:
    model, x = example_model("cnn")
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    monkeypatch.setattr(torch_support.torch, "__version__", "2.4.1")
    result = runner.invoke(app, ["audit", str(path)])
    assert result.exit_code == 2
    assert "needs torch >= 2.9 (installed: 2.4.1)" in result.output and "Traceback" not in result.output


def test_pyproject_floor_is_the_release_ci_tests() -> None:
    dependencies = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', dependencies)
    pins = re.search(r"^OLDEST_TORCH_PINS \?= torch==(\d+)\.(\d+)\.\d+ ", makefile, re.M)
    assert floor is not None and pins is not None
    assert tuple(map(int, floor.groups())) == tuple(map(int, pins.groups())) == FLOOR
    assert "make test-oldest" in (ROOT / ".ci" / "run").read_text()


def test_torchscript_and_pt2_to_onnx_work_on_the_running_release(tmp_path) -> None:
    """Both fail below the floor (2.4.1: TorchScript; up to 2.6: .pt2 -> ONNX); here they work."""
    model, x = example_model("cnn")
    scripted = tmp_path / "scripted.pt"
    torch.jit.trace(model, x).save(str(scripted))
    result = runner.invoke(app, ["audit", str(scripted), "--input-shape", "2,1,8,8", "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["format"] == "torchscript"
    program = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(program))
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(program), "--onnx", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
