"""Every input format, and every input error path: one line, exit code 2, no traceback."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from conftest import example_model
from wssi_audit.cli import app

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args))
    return result, result.output


@pytest.fixture(scope="module")
def cnn():
    return example_model("cnn")


def test_pt2_is_audited_and_verified_from_its_saved_shapes(tmp_path, cnn):
    model, x = cnn
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    result, _ = run("audit", str(path), "--format", "json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["model"]["format"] == "torch.export"
    assert document["summary"]["all_verified"] is True


def test_state_dict_needs_an_architecture(tmp_path, cnn):
    model, _ = cnn
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    result, output = run("audit", str(path))
    assert result.exit_code == 2
    assert "--arch" in output and "Traceback" not in output
    result, _ = run("audit", str(path), "--arch", "wssi_audit.models:cnn", "--input-shape", "2,1,8,8", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["all_verified"] is True


def test_training_checkpoint_with_nested_state_dict(tmp_path, cnn):
    model, _ = cnn
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)
    result, _ = run("audit", str(path), "--arch", "wssi_audit.models:cnn")
    assert result.exit_code == 0, result.output


def test_safetensors_with_architecture(tmp_path, cnn):
    from safetensors.torch import save_file

    model, _ = cnn
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    result, _ = run("audit", str(path), "--arch", "wssi_audit.models:cnn", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["format"] == "safetensors"


def test_state_dict_that_does_not_match_the_architecture(tmp_path, cnn):
    model, _ = cnn
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    result, output = run("audit", str(path), "--arch", "wssi_audit.models:mlp")
    assert result.exit_code == 2
    assert "does not match" in output and "Traceback" not in output


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))
    """
)


def test_pickled_module_is_refused_unless_trusted(tmp_path, monkeypatch):
    import sys

    (tmp_path / "usernets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernets

    path = tmp_path / "whole.pt"
    torch.save(usernets.UserNet(), path)
    del sys.modules["usernets"]

    result, output = run("audit", str(path))
    assert result.exit_code == 2
    assert "--trust-pickle" in output and "Traceback" not in output

    monkeypatch.chdir(tmp_path)
    result, output = run(
        "audit", str(path), "--trust-pickle", "--import", "usernets", "--input-shape", "3,4", "-f", "json"
    )
    assert result.exit_code == 0, output
    document = json.loads(result.stdout)
    assert document["model"]["format"] == "pickle"
    assert document["chains"][0]["weights"] == ["a.weight", "b.weight"]


def test_torchscript_is_converted_when_an_input_shape_is_given(tmp_path, cnn):
    model, x = cnn
    path = tmp_path / "scripted.pt"
    torch.jit.trace(model, x).save(str(path))
    result, output = run("audit", str(path))
    assert result.exit_code == 2 and "--input-shape" in output
    result, output = run("audit", str(path), "--input-shape", "2,1,8,8", "-f", "json")
    assert result.exit_code == 0, output
    document = json.loads(result.stdout)
    assert document["model"]["format"] == "torchscript"
    assert document["summary"]["all_verified"] is True
    assert [c["weights"] for c in document["chains"]] == [["0.weight", "2.weight", "5.weight", "9.weight", "12.weight"]]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("missing", [], "no such file"),
        ("garbage.pt", [], "cannot read"),
        ("garbage.pt2", [], "cannot read"),
        ("notes.txt", [], "unknown model format"),
        ("weights.pt", ["--arch", "no_such_package.models:net"], "cannot import"),
        ("weights.pt", ["--arch", "wssi_audit.models:no_such_factory"], "has no attribute"),
        ("weights.pt", ["--arch", "no-colon"], "package.module:factory"),
        ("weights.pt", ["--arch", "wssi_audit.models:cnn", "--input-shape", "1,x,3"], "bad --input-shape"),
        ("weights.pt", ["--arch", "wssi_audit.models:cnn", "--input-shape", "2,1,3"], "does not run on inputs"),
        ("weights.pt", ["--arch", "wssi_audit.models:cnn", "--trace", "magic"], "bad --trace"),
        ("dir", [], "directory"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, cnn, setup, args, message):
    model, _ = cnn
    path = tmp_path / setup
    if setup.startswith("garbage") or setup == "notes.txt":
        path.write_bytes(b"\x00\x01 definitely not a model \xff" * 10)
    elif setup == "weights.pt":
        torch.save(model.state_dict(), path)
    elif setup == "dir":
        path.mkdir()
    result, output = run("audit", str(path), *args)
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    assert output.strip().startswith("error:"), output
    assert message in output
    assert len(output.strip().splitlines()) <= 3  # one line, maybe soft-wrapped by the console


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"nope")
    result = runner.invoke(app, ["--debug", "audit", str(path)])
    assert result.exit_code != 0
    assert result.exception is not None
