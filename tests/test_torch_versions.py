"""The torch releases the package claims (pyproject: torch >= 2.4): what the installed one cannot
do is refused with one line naming the release it needs, and everything else works.

CI runs this suite on the oldest claimed release (2.4.1, `make test-oldest`) and on the newest
(2.14.1), so each branch below runs on a real torch of its kind.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from conftest import example_model
from wssi_audit.cli import app
from wssi_audit.errors import InputError
from wssi_audit.frontends.torch_support import NEEDS, require, supports, torch_release

runner = CliRunner()


def test_releases_are_read_from_version_strings() -> None:
    assert torch_release("2.4.1+cu121") == (2, 4)
    assert torch_release("2.14.1") == (2, 14)  # compared as numbers: 2.14 is newer than 2.5
    assert torch_release("2.10.0a0+git1234") == (2, 10)
    assert supports("torchscript", "2.14.1") and not supports("torchscript", "2.4.1")


@pytest.mark.parametrize("feature", list(NEEDS))
def test_an_old_release_gets_one_line_naming_the_release_needed(feature: str) -> None:
    (major, minor), _ = NEEDS[feature]
    with pytest.raises(InputError, match=rf"needs torch >= {major}\.{minor} \(installed: 2\.4\.1\); do this"):
        require(feature, "do this", version="2.4.1")
    require(feature, "do this", version=f"{major}.{minor}.0")  # the release it names is enough


def test_pyproject_floor_is_the_oldest_release_ci_tests() -> None:
    """The floor pyproject claims is the release `make test-oldest` installs."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    floor = next(line for line in (root / "pyproject.toml").read_text().splitlines() if '"torch>=' in line)
    pins = next(line for line in (root / "Makefile").read_text().splitlines() if line.startswith("OLDEST_TORCH_PINS"))
    assert floor.strip().strip(",").strip('"') == "torch>=2.4"
    assert "torch==2.4.1" in pins


@pytest.fixture(scope="module")
def cnn():
    return example_model("cnn")


def test_torchscript_works_or_names_the_release(tmp_path, cnn) -> None:
    model, x = cnn
    path = tmp_path / "scripted.pt"
    torch.jit.trace(model, x).save(str(path))
    result = runner.invoke(app, ["audit", str(path), "--input-shape", "2,1,8,8", "-f", "json"])
    if supports("torchscript"):
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["model"]["format"] == "torchscript"
    else:
        assert result.exit_code == 2
        assert "needs torch >= 2.5" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_onnx_export_of_a_program_works_or_names_the_release(tmp_path, cnn, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # where torch 2.4's failing exporter would leave its .sarif report
    model, x = cnn
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(path), "--onnx", str(out)])
    if supports("onnx_from_program"):
        assert result.exit_code == 0, result.output
        assert out.stat().st_size > 0
    else:
        assert result.exit_code == 2
        assert "needs torch >= 2.7" in result.output and "Traceback" not in result.output
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["m.pt2"] + (["m.onnx"] if out.exists() else []))


def test_module_export_to_onnx_works_on_every_claimed_release(tmp_path, cnn) -> None:
    """The TorchScript-based exporter (nn.Module or state dict + --arch) needs no newer torch."""
    model, _ = cnn
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "m.onnx"
    args = ["export", str(path), "--onnx", str(out), "--arch", "wssi_audit.models:cnn", "--input-shape", "2,1,8,8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
