"""`run_finetune` and `wssi-audit finetune`: outputs, exact resume, formats, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wssi_audit.errors import InputError
from wssi_audit.models import create_model
from wssi_audit.training import TrainingDiverged, run_finetune
from wssi_audit.training.data import load_digits, split_indices
from wssi_audit.training.finetune import Interrupted


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def small_data(tmp_path: Path) -> Path:
    """300 digits as a .pt file with tensors x and y (fast epochs)."""
    digits = load_digits()
    path = tmp_path / "digits300.pt"
    torch.save({"x": digits.x[:300].clone(), "y": digits.y[:300].clone()}, path)
    return path


def _save_module(tmp_path: Path, name: str, **kwargs: object) -> Path:
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pt"
    torch.save(create_model(name, **kwargs), path)
    return path


def test_finetune_writes_model_metrics_and_never_touches_the_input(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")
    before = _digest(model_path)
    result = run_finetune(
        model_path,
        data=small_data,
        epochs=2,
        lr=0.05,
        batch_size=32,
        trust_pickle=True,
        output=tmp_path / "out" / "mlp.pt",
    )
    assert _digest(model_path) == before
    assert result.output.exists() and result.checkpoint.exists()
    tuned = torch.load(result.output, weights_only=False)
    assert isinstance(tuned, torch.nn.Module)
    metrics = json.loads(result.metrics.read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["data"]["held_out"] == 60 and metrics["data"]["train"] == 240
    assert metrics["regularizer"]["covered"] and metrics["before"]["log10_intrinsic_norm"] is not None
    assert result.after.accuracy > result.before.accuracy
    assert result.after.log10_input_gradient_bound is not None


def test_resume_after_a_crash_reaches_the_same_weights(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "cnn")  # has dropout: the RNG state must be restored too
    common = {"data": small_data, "epochs": 3, "lr": 0.05, "batch_size": 64, "trust_pickle": True, "seed": 7}
    reference = run_finetune(model_path, output=tmp_path / "a" / "cnn.pt", **common)

    def crash(step: int) -> None:
        if step == 6:  # inside the second epoch (4 steps per epoch)
            raise Interrupted("simulated crash")

    output = tmp_path / "b" / "cnn.pt"
    with pytest.raises(Interrupted):
        run_finetune(model_path, output=output, step_callback=crash, **common)
    assert not output.exists()
    assert torch.load(output.with_name("cnn.pt.ckpt"), weights_only=True)["epoch"] == 1
    resumed = run_finetune(model_path, output=output, resume=True, **common)
    first = torch.load(reference.output, weights_only=False).state_dict()
    second = torch.load(resumed.output, weights_only=False).state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert resumed.history == reference.history or [h["val_accuracy"] for h in resumed.history] == [
        h["val_accuracy"] for h in reference.history
    ]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")
    output = tmp_path / "o.pt"
    run_finetune(model_path, data=small_data, epochs=1, trust_pickle=True, output=output)
    with pytest.raises(InputError, match="other settings"):
        run_finetune(model_path, data=small_data, epochs=1, lr=0.5, trust_pickle=True, output=output, resume=True)


def test_exported_program_round_trip(tmp_path: Path, small_data: Path) -> None:
    torch.manual_seed(0)
    program = torch.export.export(create_model("mlp").eval(), (torch.randn(16, 1, 8, 8),))
    model_path = tmp_path / "mlp.pt2"
    torch.export.save(program, model_path)
    result = run_finetune(model_path, data=small_data, epochs=2, lr=0.05, batch_size=32, output=tmp_path / "t.pt2")
    tuned = torch.export.load(result.output)
    assert isinstance(tuned, torch.export.ExportedProgram)
    assert result.after.accuracy > result.before.accuracy


def test_state_dict_and_safetensors_inputs_keep_their_format(tmp_path: Path, small_data: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = create_model("resnet_bn")
    state_path, safe_path = tmp_path / "r.pt", tmp_path / "r.safetensors"
    torch.save(model.state_dict(), state_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(safe_path))
    arch = "wssi_audit.models:resnet_bn"
    tiny = tmp_path / "tiny.pt"
    data = torch.load(small_data, weights_only=True)
    torch.save({"x": data["x"][:80], "y": data["y"][:80]}, tiny)
    out = run_finetune(state_path, data=tiny, epochs=1, batch_size=32, arch=arch, form="balanced")
    assert out.output == tmp_path / "r.finetuned.pt"
    assert set(torch.load(out.output, weights_only=True)) == set(model.state_dict())
    out = run_finetune(safe_path, data=tiny, epochs=1, batch_size=32, arch=arch, output=tmp_path / "s.safetensors")
    assert set(load_file(str(out.output))) == set(model.state_dict())


def test_image_folder_data(tmp_path: Path) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(5):
            pixels = (torch.rand(8, 8, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(tmp_path / "images" / label / f"{index}.png")
    model_path = _save_module(tmp_path, "mlp", classes=2)
    result = run_finetune(model_path, data=tmp_path / "images", epochs=1, batch_size=4, trust_pickle=True)
    metrics = json.loads(result.metrics.read_text())
    assert metrics["data"]["train"] == 8 and metrics["data"]["held_out"] == 2


def test_clear_errors(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")
    with pytest.raises(InputError, match="no such data"):
        run_finetune(model_path, data=tmp_path / "missing", trust_pickle=True)
    wrong = tmp_path / "wrong.pt"
    torch.save({"x": torch.rand(20, 3, 32, 32), "y": torch.randint(0, 10, (20,))}, wrong)
    with pytest.raises(InputError, match="do not fit the model"):
        run_finetune(model_path, data=wrong, trust_pickle=True)
    lengths = tmp_path / "lengths.pt"
    torch.save({"x": torch.rand(20, 1, 8, 8), "y": torch.randint(0, 10, (19,))}, lengths)
    with pytest.raises(InputError, match="expected x of shape"):
        run_finetune(model_path, data=lengths, trust_pickle=True)
    many = tmp_path / "many.npz"
    import numpy as np

    np.savez(many, x=np.random.rand(20, 1, 8, 8).astype("float32"), y=np.arange(20))
    with pytest.raises(InputError, match="outputs but the data has labels up to 19"):
        run_finetune(model_path, data=many, trust_pickle=True)
    with pytest.raises(InputError, match="must differ"):
        run_finetune(model_path, data=small_data, trust_pickle=True, output=model_path)
    with pytest.raises(InputError, match="form"):
        run_finetune(model_path, data=small_data, trust_pickle=True, form="cubic")


def test_non_finite_loss_is_a_clear_error(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*lower --lr"):
        run_finetune(model_path, data=small_data, trust_pickle=True, epochs=2, lr=1e12, strength=0.0)
    bad = tmp_path / "bad.pt"
    x = torch.rand(40, 1, 8, 8)
    x[5, 0, 0, 0] = float("nan")
    torch.save({"x": x, "y": torch.randint(0, 10, (40,))}, bad)
    with pytest.raises(InputError, match="NaN"):
        run_finetune(model_path, data=bad, trust_pickle=True)
    assert TrainingDiverged.exit_code == 2


def test_split_is_seeded() -> None:
    a, b, c = split_indices(300, 1), split_indices(300, 1), split_indices(300, 2)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert len(a[0]) == 240 and sorted(torch.cat(a).tolist()) == list(range(300))


def test_cli_finetune(tmp_path: Path, small_data: Path) -> None:
    from wssi_audit.cli import app

    model_path = _save_module(tmp_path, "mlp")
    runner = CliRunner()
    output = tmp_path / "cli.pt"
    result = runner.invoke(
        app,
        [
            "finetune",
            str(model_path),
            "--data",
            str(small_data),
            "--epochs",
            "1",
            "--trust-pickle",
            "--form",
            "balanced",
            "--strength",
            "1e-4",
            "-o",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    assert output.exists() and "before" in result.output and "held-out accuracy" in result.output
    result = runner.invoke(app, ["finetune", str(model_path), "--data", str(tmp_path / "nope"), "--trust-pickle"])
    assert result.exit_code == 2
    assert "no such data" in result.output and "Traceback" not in result.output


def test_resume_after_the_process_is_killed(tmp_path: Path, small_data: Path) -> None:
    """A real crash: SIGKILL the CLI once its first checkpoint exists, then `--resume`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from wssi_audit.cli import app

    model_path = _save_module(tmp_path, "cnn")
    options = [
        "--data",
        str(small_data),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--seed",
        "3",
        "--trust-pickle",
    ]
    reference = run_finetune(
        model_path,
        data=small_data,
        epochs=3,
        batch_size=64,
        lr=0.05,
        seed=3,
        trust_pickle=True,
        output=tmp_path / "ref" / "m.pt",
    )
    output = tmp_path / "killed" / "m.pt"
    checkpoint = output.with_name("m.pt.ckpt")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "wssi_audit", "finetune", str(model_path), *options, "-o", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists()
    result = CliRunner().invoke(app, ["finetune", str(model_path), *options, "-o", str(output), "--resume"])
    assert result.exit_code == 0, result.output
    first = torch.load(reference.output, weights_only=False).state_dict()
    second = torch.load(output, weights_only=False).state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key
