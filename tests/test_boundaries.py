"""Round trips and exit codes at every boundary of the CLI.

Whatever `balance` or `export` writes, `audit` reads back; an output path that cannot be written
is exit 2 before any work; `--debug` may stand anywhere and never changes the exit code; bad
option values (--opset, --input-shape) are exit 2 with one line; wrong-shape runs print no
traceback, in-process or from a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import example_model
from wssi_audit.cli import app
from wssi_audit.errors import describe, shorten
from wssi_audit.models import INPUT_SHAPES
from wssi_audit.ops import OP_TABLE, OpSpec, Role

runner = CliRunner()
ARCH = "wssi_audit.models:cnn"
SHAPE = ",".join(map(str, INPUT_SHAPES["cnn"]))
REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int = 2) -> str:
    output = result.output.strip()
    assert result.exit_code == code, result.output
    assert output.startswith("error:") and len(output.splitlines()) == 1 and "Traceback" not in output, output
    return output


def audit_json(*args: str | Path) -> dict:
    result = run("audit", *args, "-f", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 32)
            self.b = nn.Linear(32, 10)

        def forward(self, x):
            return self.b(torch.relu(self.a(x.flatten(1))))
    """
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """One unbalanced CNN in every format audit reads: path and the flags that read it."""
    folder = tmp_path_factory.mktemp("formats")
    model, x = example_model("cnn")
    with torch.no_grad():  # make the chain clearly unbalanced, so that balancing shows
        model[0].weight.mul_(20.0)
        model[0].bias.mul_(20.0)
    state = model.state_dict()
    paths: dict[str, tuple[Path, list[str]]] = {}
    torch.export.save(torch.export.export(model, (x,)), str(folder / "cnn.pt2"))
    paths["pt2"] = (folder / "cnn.pt2", [])
    torch.save(state, folder / "weights.pt")
    paths["state_dict"] = (folder / "weights.pt", ["--arch", ARCH, "--input-shape", SHAPE])
    checkpoint = {
        "epoch": 7,
        "optimizer_states": [{"lr": 0.1}],
        "hyper_parameters": {"lr": 0.1, "name": "cnn"},
        "state_dict": {**{f"model.{k}": v for k, v in state.items()}, "loss.weight": torch.arange(3.0)},
    }
    torch.save(checkpoint, folder / "lightning.ckpt")
    paths["checkpoint"] = (folder / "lightning.ckpt", ["--arch", ARCH, "--input-shape", SHAPE])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "weights.safetensors"))
    paths["safetensors"] = (folder / "weights.safetensors", ["--arch", ARCH, "--input-shape", SHAPE])
    torch.jit.trace(model, x).save(str(folder / "scripted.pt"))
    paths["torchscript"] = (folder / "scripted.pt", ["--input-shape", SHAPE])
    from wssi_audit.commands.export import export_onnx

    export_onnx(model, (x,), folder / "cnn.onnx")
    paths["onnx"] = (folder / "cnn.onnx", [])
    (folder / "usernets_boundaries.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    import usernets_boundaries

    torch.save(usernets_boundaries.Net(), folder / "whole.pt")
    paths["pickle"] = (
        folder / "whole.pt",
        ["--trust-pickle", "--import", "usernets_boundaries", "--input-shape", SHAPE],
    )
    return paths


# Balance output name per input format, and what `audit` then reads it as.
BALANCED = {
    "pt2": ("balanced.pt2", "torch.export"),
    "state_dict": ("balanced.pt", "state_dict"),
    "checkpoint": ("balanced.ckpt", "state_dict"),
    "safetensors": ("balanced.safetensors", "safetensors"),
    "torchscript": ("balanced.pt2", "torch.export"),
    "onnx": ("balanced.onnx", "onnx"),
    "pickle": ("balanced.pt", "pickle"),
}
READ_BACK_FLAGS = {"torch.export": [], "onnx": []}


@pytest.mark.parametrize("fmt", BALANCED)
def test_balance_writes_what_audit_reads_back(models, tmp_path, fmt):
    path, flags = models[fmt]
    name, read_as = BALANCED[fmt]
    out = tmp_path / name
    before = audit_json(path, *flags)
    result = run("balance", path, "-o", out, *flags)
    assert result.exit_code == 0, result.output
    read_flags = READ_BACK_FLAGS.get(read_as, flags)
    after = audit_json(out, *read_flags)
    assert after["model"]["format"] == read_as
    assert after["summary"]["max_imbalance_decades"] < 0.01 < before["summary"]["max_imbalance_decades"]
    assert after["summary"]["all_verified"] is True


def test_balanced_checkpoint_keeps_its_other_entries(models, tmp_path):
    path, flags = models["checkpoint"]
    out = tmp_path / "balanced.ckpt"
    assert run("balance", path, "-o", out, *flags).exit_code == 0
    original = torch.load(path, weights_only=True)
    balanced = torch.load(out, weights_only=True)
    assert set(balanced) == set(original)
    for key in ("epoch", "optimizer_states", "hyper_parameters"):
        assert balanced[key] == original[key]
    assert set(balanced["state_dict"]) == set(original["state_dict"])
    assert torch.equal(balanced["state_dict"]["loss.weight"], original["state_dict"]["loss.weight"])
    assert not torch.equal(balanced["state_dict"]["model.0.weight"], original["state_dict"]["model.0.weight"])


@pytest.mark.parametrize(
    ("fmt", "name", "expected"),
    [
        ("pt2", "balanced.pt", "balanced.pt2"),
        ("torchscript", "balanced.pt", "balanced.pt2"),
        ("onnx", "balanced.pt2", "balanced.onnx"),
        ("state_dict", "balanced.onnx", ".pt or .pth"),
        ("checkpoint", "balanced.safetensors", "training checkpoint"),
        ("pt2", "balanced", "balanced.pt2"),
    ],
)
def test_balance_output_name_must_match_what_it_writes(models, tmp_path, fmt, name, expected):
    path, flags = models[fmt]
    output = one_line_error(run("balance", path, "-o", tmp_path / name, *flags))
    assert expected in output
    assert list(tmp_path.iterdir()) == []


EXPORTABLE = ["pt2", "state_dict", "checkpoint", "safetensors", "torchscript", "pickle"]


@pytest.mark.parametrize("fmt", EXPORTABLE)
def test_export_writes_onnx_that_audit_reads_back(models, tmp_path, fmt):
    path, flags = models[fmt]
    out = tmp_path / "model.onnx"
    result = run("export", path, "--onnx", out, *flags)
    assert result.exit_code == 0, result.output
    document = audit_json(out)
    assert document["model"]["format"] == "onnx"
    assert document["summary"]["all_verified"] is True
    original = audit_json(path, *flags)
    assert [len(c["weights"]) for c in document["chains"]] == [len(c["weights"]) for c in original["chains"]]


def test_export_needs_an_onnx_name(models, tmp_path):
    path, _ = models["pt2"]
    assert ".onnx" in one_line_error(run("export", path, "--onnx", tmp_path / "model.pt"))
    assert list(tmp_path.iterdir()) == []


def _opset_ranges() -> dict[str, range]:
    """Independently of the command: the ranges torch.onnx states for its two exporters."""
    from torch.onnx import _constants
    from torch.onnx._internal.exporter import _constants as dynamo

    return {
        "pt2": range(dynamo.TORCHLIB_OPSET, _constants.ONNX_MAX_OPSET + 1),
        "state_dict": range(_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1),
    }


@pytest.mark.parametrize("fmt", ["pt2", "state_dict"])
def test_opset_outside_the_exporters_range_is_exit_2_and_inside_is_written(models, tmp_path, fmt):
    import onnx

    path, flags = models[fmt]
    supported = _opset_ranges()[fmt]
    for opset in (supported.start - 1, supported.stop, 0, 99):
        output = one_line_error(run("export", path, "--onnx", tmp_path / "bad.onnx", "--opset", opset, *flags))
        assert f"{supported.start}-{supported.stop - 1}" in output
    assert not (tmp_path / "bad.onnx").exists()
    for opset in (supported.start, supported.stop - 1):
        out = tmp_path / f"opset{opset}.onnx"
        result = run("export", path, "--onnx", out, "--opset", opset, *flags)
        assert result.exit_code == 0, result.output
        written = onnx.load(str(out)).opset_import
        assert [entry.version for entry in written if entry.domain in ("", "ai.onnx")] == [opset]


# --- output paths ------------------------------------------------------------------------------------


def _output_commands(models, target: Path) -> dict[str, list]:
    pt2, _ = models["pt2"]
    return {
        "audit": ["audit", pt2, "-o", target],
        "check": ["check", pt2, "-o", target],
        "balance": ["balance", pt2, "-o", target],
        "export": ["export", pt2, "--onnx", target],
        "finetune": ["finetune", pt2, "-o", target],
    }


def _suffix(command: str) -> str:
    return {"balance": ".pt2", "export": ".onnx", "finetune": ".pt2"}.get(command, ".json")


@pytest.mark.parametrize("command", ["audit", "check", "balance", "export", "finetune"])
@pytest.mark.parametrize("kind", ["folder", "under-a-file", "read-only-folder"])
def test_unwritable_output_is_exit_2_before_any_work(models, tmp_path, command, kind):
    if kind == "folder":
        target = tmp_path / f"out{_suffix(command)}"
        target.mkdir()
        message = "is a folder"
    elif kind == "under-a-file":
        (tmp_path / "plain").write_text("x")
        target = tmp_path / "plain" / f"out{_suffix(command)}"
        message = "is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / f"out{_suffix(command)}"
        message = "not writable"
    output = one_line_error(run(*_output_commands(models, target)[command]))
    assert message in output
    assert not target.is_file()


@pytest.mark.parametrize(("command", "option"), [("experiment", "--output"), ("demo", "--output-dir")])
def test_folder_outputs_must_be_folders(tmp_path, command, option):
    (tmp_path / "plain").write_text("x")
    assert "is a file" in one_line_error(run(command, option, tmp_path / "plain"))
    assert "is a file, not a folder" in one_line_error(run(command, option, tmp_path / "plain" / "sub"))


def test_a_write_that_fails_late_is_exit_2_not_internal(tmp_path):
    """The atomic writers turn an OSError into one line (here: the folder disappears mid-run)."""
    from wssi_audit.cli_support import save_atomic, write_atomic
    from wssi_audit.errors import InputError

    (tmp_path / "plain").write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        write_atomic(tmp_path / "plain" / "report.json", "{}")

    def fails(tmp: str) -> None:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(InputError, match="Permission denied"):
        save_atomic(tmp_path / "model.pt2", fails)
    assert list(tmp_path.iterdir()) == [tmp_path / "plain"]


# --- --debug -------------------------------------------------------------------------------------------


@pytest.fixture
def sigmoid_model(tmp_path, monkeypatch):
    """Sigmoid mis-classified as homogeneous: the self-check must fail (exit 3)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 2))
    path = tmp_path / "sigmoid.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(path))
    monkeypatch.setitem(OP_TABLE, "sigmoid", OpSpec(Role.HOMOGENEOUS, lipschitz=0.25))
    return path


def _cases(models, sigmoid_model, tmp_path):
    pt2, _ = models["pt2"]
    return {
        0: ["audit", pt2],
        1: ["check", pt2, "--max-imbalance", "0.001"],
        2: ["audit", tmp_path / "missing.pt2"],
        3: ["audit", sigmoid_model],
    }


@pytest.mark.parametrize("code", [0, 1, 2, 3])
def test_debug_anywhere_keeps_the_exit_code(models, sigmoid_model, tmp_path, code):
    args = [str(a) for a in _cases(models, sigmoid_model, tmp_path)[code]]
    plain = runner.invoke(app, args)
    assert plain.exit_code == code, plain.output
    for position in (0, 1, len(args)):
        with_debug = runner.invoke(app, [*args[:position], "--debug", *args[position:]])
        assert with_debug.exit_code == code, (position, with_debug.output)
        if code == 2:
            assert "Traceback" in with_debug.stderr and "Traceback" not in plain.output
            assert with_debug.stderr.strip().splitlines()[-1].startswith("error:")


def test_debug_after_the_model_in_the_shorthand(models):
    pt2, _ = models["pt2"]
    result = runner.invoke(app, [str(pt2), "-f", "json", "--debug"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["format"] == "torch.export"


def test_debug_after_double_dash_is_an_argument(models):
    result = runner.invoke(app, ["audit", "--", "--debug"])
    assert result.exit_code == 2 and "no such file: --debug" in result.output


# --- option values, messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("1,,8", "positive integers"),
        ("2,1,8,8,", "positive integers"),
        (",2", "positive integers"),
        ("2;", "positive integers"),
        ("2,x", "positive integers"),
        ("0,1,8,8", "positive integer"),
        ("-2,1,8,8", "positive integers"),
        ("1000000,1000000", "GiB"),
        (f"{10**6},{10**6},{10**6}", "GiB"),
        ("2,1,8,8;1000000,1000000", "GiB"),
    ],
)
def test_bad_input_shape_is_exit_2(models, shape, message):
    path, _ = models["state_dict"]
    assert message in one_line_error(run("audit", path, "--arch", ARCH, "--input-shape", shape))


def test_input_shape_memory_bound_is_the_machines():
    from wssi_audit.loading import INPUT_MEMORY_FRACTION, parse_input_shape
    from wssi_audit.safe_archive import physical_memory

    fits = int(INPUT_MEMORY_FRACTION * physical_memory() / 8)
    assert parse_input_shape(f"1,{fits}") == [(1, fits)]
    with pytest.raises(Exception, match="GiB"):
        parse_input_shape(f"1,{fits + 1}")


def test_missing_onnx_initializer_says_so(tmp_path):
    from onnx import TensorProto, helper, numpy_helper, save

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = tmp_path / "missing.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    output = one_line_error(run("audit", path))
    assert "'w2'" in output and "missing initializer" in output


def test_long_messages_are_cut_at_a_word_boundary(tmp_path):
    factory = tmp_path / "noisy_factory.py"
    factory.write_text("def make():\n    raise ValueError(' '.join(['sentence'] * 300))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        output = one_line_error(run("audit", _state_dict(tmp_path), "--arch", "noisy_factory:make"))
    finally:
        sys.path.remove(str(tmp_path))
    assert output.endswith("sentence…"), output


def _state_dict(folder: Path) -> Path:
    model, _ = example_model("cnn")
    path = folder / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


words = st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=12), min_size=1, max_size=80)


@given(words, st.integers(min_value=20, max_value=200))
def test_shorten_never_cuts_a_word(parts, limit):
    text = " ".join(parts)
    short = shorten(text, limit)
    assert len(short) <= limit
    if short == text:
        return
    assert short.endswith("…")
    kept = short[:-1].split(" ")
    assert kept[:-1] == parts[: len(kept) - 1]
    last = parts[len(kept) - 1]
    # the last kept word is whole, unless it alone spans the second half of the limit
    assert kept[-1] == last or (last.startswith(kept[-1]) and len(last) >= limit // 2 - 2)


def test_describe_is_one_line():
    error = RuntimeError("first line\nsecond line\n" + "x " * 500)
    text = describe(error)
    assert "\n" not in text and text.startswith("RuntimeError: first line")


# --- wrong shapes in a real process ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "command", "shape"),
    [("pt2", "audit", "2,3"), ("state_dict", "export", "2,3,5,5"), ("pt2", "balance", "2,3")],
)
def test_wrong_shape_prints_one_line_and_no_traceback(models, tmp_path, fmt, command, shape):
    path, flags = models[fmt]
    flags = [f for i, f in enumerate(flags) if f != "--input-shape" and (i == 0 or flags[i - 1] != "--input-shape")]
    extra = {"audit": [], "export": ["--onnx", str(tmp_path / "m.onnx")], "balance": ["-o", str(tmp_path / "b.pt2")]}
    process = subprocess.run(
        [sys.executable, "-m", "wssi_audit", command, str(path), *flags, *extra[command], "--input-shape", shape],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert process.returncode == 2, process.stderr
    assert process.stdout == ""
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not run on inputs" in lines[0], process.stderr
    assert list(tmp_path.iterdir()) == []


def test_real_lightning_checkpoint_is_audited_and_balanced_in_place(tmp_path):
    """A checkpoint written by Lightning's Trainer: weights under state_dict as 'model.<key>',
    next to loops, callbacks, optimizer states and hyper-parameters."""
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 0.05})
            self.model = example_model("cnn")[0]

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.arange(16) % 10)
    trainer = lightning.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    path = tmp_path / "lightning.ckpt"
    trainer.save_checkpoint(path)
    flags = ["--arch", ARCH, "--input-shape", SHAPE]
    assert audit_json(path, *flags)["summary"]["all_verified"] is True
    out = tmp_path / "balanced.ckpt"
    assert run("balance", path, "-o", out, *flags).exit_code == 0
    original, balanced = torch.load(path, weights_only=True), torch.load(out, weights_only=True)
    assert set(balanced) == set(original) and set(balanced["state_dict"]) == set(original["state_dict"])
    assert balanced["hyper_parameters"] == original["hyper_parameters"]
    assert audit_json(out, *flags)["summary"]["max_imbalance_decades"] < 0.01
