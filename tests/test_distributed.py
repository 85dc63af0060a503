"""`finetune` under torchrun: 2 gloo processes on CPU.

* both ranks end bit-identical, and equal (to float tolerance) to one process with the doubled batch
  (an MLP: no BatchNorm), with the regularizer on: it acts once per step on every rank;
* rank 0 is the only writer (each rank is given its own output path here; rank 1's stays empty);
* a run interrupted in its second epoch resumes under DDP to the uninterrupted run's weights, bit for bit;
* `torchrun ... -m wssi_audit finetune` and the `wssi-audit` script under torchrun work;
* an interrupted run leaves no DDP wrapper for interpreter exit to free (the torch 2.9 hang).
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from wssi_audit.models import create_model
from wssi_audit.training import run_finetune
from wssi_audit.training.data import load_digits
from wssi_audit.training.finetune import Interrupted

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
SETTINGS = {"epochs": 2, "lr": 0.05, "strength": 0.05, "seed": 4, "device": "cpu", "trust_pickle": True}

# Run by each torchrun process: fine-tune, then save this rank's weights (the test's own file, not
# run_finetune's output) so the ranks can be compared. CRASH_AT stops every rank at that step.
# A rank still running after 240 s (a run takes seconds) prints every thread's stack and exits 1:
# a hang, seen once on torch 2.9 in the crash run, then fails with where it hung.
WORKER = """
import faulthandler, json, os, sys, torch
faulthandler.dump_traceback_later(240, exit=True)
from wssi_audit.training import run_finetune
from wssi_audit.training.finetune import Interrupted
rank = int(os.environ["RANK"])
kwargs = json.loads(sys.argv[1])
out = kwargs.pop("weights_dir")
kwargs["output"] = kwargs["output"].replace("RANK", str(rank))
crash = int(os.environ.get("CRASH_AT", "0"))
def callback(step):
    if step == crash:
        raise Interrupted("simulated crash")
try:
    result = run_finetune(step_callback=callback if crash else None, **kwargs)
except Interrupted:
    sys.exit(0)
state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
torch.save({"state": state, "world": result.world_size, "history": result.history}, f"{out}/rank{rank}.pt")
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(arguments: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *arguments]
    result = subprocess.run(command, env=env or _env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    digits = load_digits()  # 300 examples: 240 train (120 per rank), 60 held out
    torch.save({"x": digits.x[:300].clone(), "y": digits.y[:300].clone()}, root / "data.pt")
    torch.manual_seed(0)
    torch.save(create_model("mlp"), root / "mlp.pt")
    (root / "worker.py").write_text(WORKER)
    return {"root": root, "data": root / "data.pt", "model": root / "mlp.pt", "worker": root / "worker.py"}


def _ddp(setup: dict[str, Path], name: str, crash: int = 0, resume: bool = False) -> Path:
    weights = setup["root"] / f"{name}-weights"
    weights.mkdir(exist_ok=True)
    kwargs = {
        "model_path": str(setup["model"]),
        "data": str(setup["data"]),
        "batch_size": BATCH,
        "output": str(setup["root"] / name / "rankRANK" / "m.pt"),
        "resume": resume,
        "weights_dir": str(weights),
        **SETTINGS,
    }
    env = {**_env(), "CRASH_AT": str(crash)}
    _torchrun([str(setup["worker"]), json.dumps(kwargs)], env)
    return weights


@pytest.fixture(scope="module")
def ddp_run(setup: dict[str, Path]) -> Path:
    return _ddp(setup, "straight")


def test_two_processes_equal_one_with_the_doubled_batch(setup: dict[str, Path], ddp_run: Path) -> None:
    rank0 = torch.load(ddp_run / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_run / "rank1.pt", weights_only=True)
    assert rank0["world"] == rank1["world"] == 2
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key  # both ranks identical, bit for bit
    single = run_finetune(
        setup["model"], data=setup["data"], batch_size=2 * BATCH, output=setup["root"] / "single" / "m.pt", **SETTINGS
    )
    reference = single.model.state_dict()
    for key, value in rank0["state"].items():
        assert torch.allclose(value, reference[key], rtol=1e-5, atol=1e-6), (
            key,
            float((value - reference[key]).abs().max()),
        )
    # Control: the run really moved the weights (so equality above is not trivial) ...
    start = torch.load(setup["model"], weights_only=False).state_dict()
    assert max(float((start[k] - v).abs().max()) for k, v in reference.items()) > 1e-2
    # ... and without the regularizer one process ends elsewhere: the regularizer acted on both ranks.
    plain = run_finetune(
        setup["model"],
        data=setup["data"],
        batch_size=2 * BATCH,
        output=setup["root"] / "plain" / "m.pt",
        **{**SETTINGS, "strength": 0.0},
    )
    gap = max(float((plain.model.state_dict()[k] - v).abs().max()) for k, v in rank0["state"].items())
    assert gap > 1e-4
    # Same examples seen per epoch (each rank half of them), same held-out figures.
    assert [h["examples"] for h in rank0["history"]] == [h["examples"] for h in single.history] == [240, 240]
    assert [h["val_accuracy"] for h in rank0["history"]] == pytest.approx([h["val_accuracy"] for h in single.history])


def test_rank_zero_is_the_only_writer(setup: dict[str, Path], ddp_run: Path) -> None:
    written = setup["root"] / "straight"
    assert sorted(p.name for p in (written / "rank0").iterdir()) == ["m.pt", "m.pt.ckpt", "m.pt.metrics.json"]
    assert not (written / "rank1").exists()
    metrics = json.loads((written / "rank0" / "m.pt.metrics.json").read_text())
    assert metrics["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert metrics["throughput"]["examples_per_second"] > 0
    assert len(torch.load(written / "rank0" / "m.pt.ckpt", weights_only=True)["rng"]) == 2  # every rank's RNG


def test_resume_under_ddp_reaches_the_same_weights(setup: dict[str, Path], ddp_run: Path) -> None:
    steps_per_epoch = 8  # 120 examples per rank, batch 16
    crashed = _ddp(setup, "crashed", crash=steps_per_epoch + 3)
    assert not list(crashed.iterdir())  # stopped before the end
    checkpoint = setup["root"] / "crashed" / "rank0" / "m.pt.ckpt"
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    resumed = _ddp(setup, "crashed", resume=True)
    for rank in (0, 1):
        got = torch.load(resumed / f"rank{rank}.pt", weights_only=True)["state"]
        want = torch.load(ddp_run / f"rank{rank}.pt", weights_only=True)["state"]
        for key in want:
            assert torch.equal(got[key], want[key]), (rank, key)
    assert not (setup["root"] / "crashed" / "rank1").exists()


def test_torchrun_cli_and_the_script(setup: dict[str, Path]) -> None:
    options = ["--data", str(setup["data"]), "--epochs", "1", "--batch-size", str(BATCH), "--device", "cpu"]
    options += ["--trust-pickle", "--optimizer", "adamw", "--lr", "1e-3", "--schedule", "cosine", "--warmup-steps", "2"]
    output = setup["root"] / "cli" / "m.pt"
    result = _torchrun(["-m", "wssi_audit", "finetune", str(setup["model"]), *options, "-o", str(output)])
    assert "distributed: 2 processes (gloo)" in result.stdout
    assert result.stdout.count("fine-tuned model written") == 1  # rank 0 alone reports
    metrics = json.loads(output.with_name("m.pt.metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2 and metrics["config"]["optimizer"] == "adamw"
    script = Path(sys.executable).with_name("wssi-audit")
    if not script.exists():
        pytest.skip("the wssi-audit script is not installed beside this interpreter")
    output = setup["root"] / "script" / "m.pt"
    _torchrun(["--no-python", str(script), "finetune", str(setup["model"]), *options, "-o", str(output)])
    assert output.exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_interrupted_run_frees_its_ddp_before_the_group_goes(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hang of docs/reliability.md section 7: an interruption's traceback kept the run's DDP
    wrapper alive past destroy_process_group, its reducer then destroyed the gloo group at interpreter
    exit, and that deadlocked with a gloo worker thread. Here a one-process gloo group in this
    process: when run_finetune has raised, the wrapper is gone though the traceback is still held."""
    environment = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    wrappers: list[weakref.ref[DistributedDataParallel]] = []

    def crash(step: int) -> None:
        wrappers.extend(weakref.ref(o) for o in gc.get_objects() if isinstance(o, DistributedDataParallel))
        raise Interrupted("simulated crash")

    try:
        with pytest.raises(Interrupted) as caught:
            kwargs = {**SETTINGS, "data": setup["data"], "batch_size": BATCH, "step_callback": crash}
            run_finetune(setup["model"], output=setup["root"] / "interrupted" / "m.pt", **kwargs)
        assert len(wrappers) == 1  # control: the run was wrapped (a group of one is still gloo + DDP)
        assert caught.value.__traceback__ is not None
        assert wrappers[0]() is None
        assert not dist.is_initialized()  # the group this run made is destroyed
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
