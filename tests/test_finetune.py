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


# ------------------------------------------------------------------ one digits split with the demo
def test_digits_held_out_never_holds_an_example_the_demo_trained_on() -> None:
    from wssi_audit.demo import digits_tensors
    from wssi_audit.training.data import load_data

    demo_x, demo_y, demo_test_x, _ = digits_tensors()  # what train_demo_model trains on
    trained = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(demo_x, demo_y)}
    assert len(trained) == len(demo_x) == 1437  # digits has no duplicate images: content identifies examples
    for seed in (0, 5):
        held = load_data("digits", seed=seed).held_out  # what `finetune --data digits` evaluates on
        held_keys = {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(held.x, held.y)}
        assert len(held_keys) == 360 and not held_keys & trained
        assert torch.equal(held.x, demo_test_x)
    # Control: an independent seeded split (what finetune did before) does overlap the demo's training set.
    digits = load_digits()
    _, other = split_indices(len(digits.y), 1)
    leaked = {(bytes(digits.x[i].numpy().tobytes()), int(digits.y[i])) for i in other.tolist()}
    assert len(leaked & trained) > 200
    with pytest.raises(InputError, match="fixed split"):
        load_data("digits", held_out=0.3)


def test_finetune_on_digits_reports_the_demo_split(tmp_path: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")
    result = run_finetune(model_path, epochs=1, batch_size=256, trust_pickle=True, output=tmp_path / "d.pt")
    metrics = json.loads(result.metrics.read_text())
    assert metrics["data"]["train"] == 1437 and metrics["data"]["held_out"] == 360


# ---------------------------------------------------------------------------- shapes and options
def test_mlp_on_64_features_fine_tunes_on_1x8x8_data(tmp_path: Path, small_data: Path) -> None:
    torch.manual_seed(0)
    flat = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    model_path = tmp_path / "flat.pt"
    torch.save(flat, model_path)
    result = run_finetune(model_path, data=small_data, epochs=2, lr=0.05, batch_size=32, trust_pickle=True)
    metrics = json.loads(result.metrics.read_text())
    assert metrics["data"]["example_shape"] == [1, 8, 8] and metrics["data"]["model_input_shape"] == [64]
    assert result.after.accuracy > result.before.accuracy
    # Control: a model whose input has another number of elements is still refused clearly.
    torch.save(torch.nn.Sequential(torch.nn.Linear(50, 10)), tmp_path / "fifty.pt")
    with pytest.raises(InputError, match=r"shape \(1, 8, 8\) do not fit the model"):
        run_finetune(tmp_path / "fifty.pt", data=small_data, trust_pickle=True)


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")  # no dropout, no BatchNorm
    common = {"data": small_data, "epochs": 2, "lr": 0.05, "strength": 0.05, "trust_pickle": True, "seed": 1}
    accumulated = run_finetune(model_path, batch_size=16, grad_accum=2, output=tmp_path / "a.pt", **common)
    big = run_finetune(model_path, batch_size=32, output=tmp_path / "b.pt", **common)
    small = run_finetune(model_path, batch_size=16, output=tmp_path / "c.pt", **common)
    a, b, c = (r.model.state_dict() for r in (accumulated, big, small))
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3  # control: accumulation changed the step
    assert [h["examples"] for h in accumulated.history] == [240, 240]


def test_warmup_cosine_schedule_values() -> None:
    from wssi_audit.training.optim import WarmupSchedule

    schedule = WarmupSchedule("cosine", total=10, warmup=2)
    assert [schedule(s) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert schedule(2) == pytest.approx(1.0) and schedule(10) == pytest.approx(0.0)
    assert schedule(6) == pytest.approx(0.5)
    assert WarmupSchedule("constant", total=10, warmup=0)(7) == 1.0


def test_adamw_cosine_warmup_and_bf16_on_cpu(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")
    result = run_finetune(
        model_path,
        data=small_data,
        epochs=2,
        lr=3e-3,
        batch_size=32,
        trust_pickle=True,
        optimizer="adamw",
        schedule="cosine",
        warmup_steps=3,
        amp="bf16",
        weight_decay=0.05,
        output=tmp_path / "w.pt",
    )
    metrics = json.loads(result.metrics.read_text())
    assert metrics["config"]["amp"] == "bfloat16" and metrics["config"]["optimizer"] == "adamw"
    assert result.after.accuracy > result.before.accuracy
    assert all(h["examples_per_second"] > 0 for h in metrics["history"])
    assert metrics["throughput"]["examples_per_second"] > 0


def test_bad_training_options_are_clear(tmp_path: Path, small_data: Path) -> None:
    model_path = _save_module(tmp_path, "mlp")
    cases = [
        ({"amp": "fp16", "device": "cpu"}, "needs CUDA"),
        ({"optimizer": "lion"}, "bad --optimizer"),
        ({"schedule": "step"}, "bad --schedule"),
        ({"grad_accum": 0}, "grad-accum"),
        ({"amp": "fp8"}, "bad --amp"),
        ({"held_out": 1.5}, "held-out"),
    ]
    for options, message in cases:
        with pytest.raises(InputError, match=message):
            run_finetune(model_path, data=small_data, trust_pickle=True, **options)
    transformer = _save_module(tmp_path, "transformer_block")
    with pytest.raises(InputError, match=r"nothing to regularize.*--strength 0"):
        run_finetune(transformer, data=small_data, trust_pickle=True, epochs=1)


def test_streamed_image_folder_with_workers_and_a_broken_image(tmp_path: Path) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(12):
            pixels = (torch.rand(8, 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="RGB").save(tmp_path / "images" / label / f"{index}.png")
    torch.manual_seed(0)
    model_path = tmp_path / "cnn.pt"
    torch.save(create_model("cnn", in_channels=3, classes=2), model_path)
    result = run_finetune(model_path, data=tmp_path / "images", epochs=1, batch_size=8, trust_pickle=True, workers=2)
    metrics = json.loads(result.metrics.read_text())
    assert metrics["data"]["loader_workers"] == 2 and metrics["data"]["example_shape"] == [3, 8, 8]
    assert "streamed" in metrics["data"]["description"]
    (tmp_path / "images" / "b" / "5.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"^cannot read image .*5\.png") as caught:
        run_finetune(model_path, data=tmp_path / "images", epochs=1, batch_size=8, trust_pickle=True, workers=2)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_cli_training_options(tmp_path: Path, small_data: Path) -> None:
    from wssi_audit.cli import app

    model_path = _save_module(tmp_path, "mlp")
    output = tmp_path / "o.pt"
    options = ["--optimizer", "adamw", "--lr", "1e-3", "--schedule", "cosine", "--warmup-steps", "2"]
    options += ["--grad-accum", "2", "--amp", "off", "--batch-size", "32", "--held-out", "0.25"]
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            str(model_path),
            "--data",
            str(small_data),
            "--epochs",
            "1",
            "--trust-pickle",
            *options,
            "-o",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ex/s" in result.output and "examples/s" in result.output
    metrics = json.loads(output.with_name("o.pt.metrics.json").read_text())
    assert metrics["config"]["grad_accum"] == 2 and metrics["data"]["held_out"] == 75
    bad = CliRunner().invoke(
        app,
        ["finetune", str(model_path), "--data", str(small_data), "--trust-pickle", "--amp", "fp16", "--device", "cpu"],
    )
    assert bad.exit_code == 2 and "needs CUDA" in bad.output and "Traceback" not in bad.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_finetune_with_amp(tmp_path: Path, small_data: Path, amp: str) -> None:
    model_path = _save_module(tmp_path, "cnn", batch_norm=True)
    result = run_finetune(
        model_path, data=small_data, epochs=2, lr=0.05, batch_size=32, trust_pickle=True, device="cuda", amp=amp
    )
    metrics = json.loads(result.metrics.read_text())
    assert (
        metrics["device"].startswith("cuda")
        and metrics["config"]["amp"] == {"fp16": "float16", "bf16": "bfloat16"}[amp]
    )
    assert result.after.accuracy > result.before.accuracy


def test_readme_workflow_demo_then_finetune_evaluates_on_the_demo_test_set(tmp_path: Path) -> None:
    """`wssi-audit demo` then `finetune demo_out/digits_cnn.pt2 --data digits`: the fine-tune's held-out
    accuracy before training is the demo's own test accuracy (same 360 images, never trained on)."""
    from wssi_audit.demo import build_demo

    demo = build_demo(tmp_path / "demo_out", arch="mlp", epochs=2, seed=3)
    result = run_finetune(demo.path, epochs=1, batch_size=64, seed=9, output=tmp_path / "tuned.pt2")
    assert result.before.accuracy == pytest.approx(demo.test_accuracy, abs=1e-6)
    assert json.loads(result.metrics.read_text())["data"]["held_out"] == 360
