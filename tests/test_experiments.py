"""Structure of the experiment outputs on a tiny grid (the numbers are not checked)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from wssi_audit.experiments import ExperimentConfig, quick_config, run_experiments
from wssi_audit.experiments.attacks import evaluate_robustness, fgsm, pgd


def tiny_config(directory: Path) -> ExperimentConfig:
    return replace(
        quick_config(),
        name="test",
        cells=[("digits", 1.0, "mlp")],
        seeds=2,
        sweep_seeds=1,
        epochs=1,
        strengths={"wd": [5e-4], "log": [6e-3]},
        probe_strengths={},
        guard_cells=["mlp"],
        adam_strengths={"wd": [1e-2], "log": [2e-3]},
        adam_archs=["mlp"],
        shift_archs=["mlp"],
        shifts=1,
        equivariant_archs=["mlp"],
        equivariant_strengths={},
        finetune_epochs=1,
        eps=[0.0, 0.05],
        pgd_steps=2,
        workers=1,
        output=str(directory / "results"),
        markdown=str(directory / "results.md"),
    )


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    directory = tmp_path_factory.mktemp("experiment")
    import os

    cwd, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(directory)  # the raw dump goes to ./build
    torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription
    try:
        results = run_experiments(tiny_config(directory), progress=lambda _: None)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return results, directory


def test_outputs_exist(grid: tuple[dict, Path]) -> None:
    results, directory = grid
    markdown = (directory / "results.md").read_text()
    assert "BEGIN GENERATED RESULTS" in markdown and "Regime 1" in markdown and "Regime 4" in markdown
    for name in (
        "summary.json",
        "runs_sgd.json",
        "runs_adam.json",
        "runs_shift.json",
        "runs_finetune.json",
        "sgd_selected.png",
        "sgd_sweeps.png",
        "shift.png",
        "shift_eq.png",
        "finetune.png",
    ):
        assert (directory / "results" / name).stat().st_size > 0, name
    assert (directory / "build" / "experiment-raw-test.json").exists()
    summary = json.loads((directory / "results" / "summary.json").read_text())
    assert {"config", "attack", "machine", "demo", "selection", "analysis", "seconds"} <= set(summary)
    assert summary["attack"]["pgd_steps"] == 2 and summary["attack"]["threat_model"] == "Linf"
    assert {"sgd", "adam", "shift", "shift_eq", "finetune", "collapsed_runs"} <= set(summary["analysis"])
    assert set(results) >= {"runs", "analysis", "demo"}


def test_run_records(grid: tuple[dict, Path]) -> None:
    results, directory = grid
    runs = json.loads((directory / "results" / "runs_sgd.json").read_text())
    assert {r["arm"] for r in runs} == {"none", "wd", "log", "log_guard"}
    keys = {
        "test_accuracy",
        "val_accuracy",
        "fgsm",
        "pgd",
        "input_gradient_norm",
        "log10_intrinsic_norm",
        "max_imbalance_decades",
        "train_seconds",
        "collapsed",
        "seed",
        "strength",
    }
    for record in results["runs"]:
        if record["regime"] != "finetune":
            assert keys <= set(record)
        for attack in ("fgsm", "pgd"):
            assert record[attack]["0"] == record["test_accuracy"]  # eps = 0 is clean accuracy
            assert all(v <= record["test_accuracy"] + 1e-9 for v in record[attack].values())
    for regime in ("shift", "shift_eq"):
        shift = [r for r in results["runs"] if r["regime"] == regime]
        assert {r["shift"] for r in shift} == {-1, 0}
    assert all("_predictions" not in r for r in results["runs"])


def test_core_demo_is_invariant(grid: tuple[dict, Path]) -> None:
    demo = grid[0]["demo"]
    assert demo["max_abs_logit_change"] < 1e-8 * max(1.0, demo["max_abs_logit"])
    assert demo["weight_decay_penalty"]["factor"] != pytest.approx(1.0, rel=1e-3)
    for penalty in demo["invariant_penalties"].values():
        assert penalty["relative_change"] < 1e-9


def test_attacks_respect_the_ball() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    for attack in (fgsm, pgd):
        adv = attack(model, x, y, 0.1)
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert torch.equal(attack(model, x, y, 0.0), x)
    result = evaluate_robustness(model, x, y, [0.0, 0.05, 0.2], steps=5)
    assert result["pgd"]["0"] == result["clean_accuracy"] == result["fgsm"]["0"]
    assert result["pgd"]["0.2"] <= result["pgd"]["0.05"] + 1e-9 or result["pgd"]["0.05"] == 0


def test_rebuild_from_raw(grid: tuple[dict, Path]) -> None:
    from wssi_audit.experiments.report import rebuild

    results, directory = grid
    config = tiny_config(directory / "rebuilt")
    rebuilt = rebuild(directory / "build" / "experiment-raw-test.json", directory / "results" / "summary.json", config)
    assert (directory / "rebuilt" / "results.md").exists()
    assert rebuilt["analysis"]["sgd"].keys() == results["analysis"]["sgd"].keys()


def test_equivariant_lr_makes_shifts_irrelevant(grid: tuple[dict, Path]) -> None:
    """With learning rates scaled by g_l^2 / c_l^2, a shifted init trains to the same function."""
    stats = grid[0]["analysis"]["shift_eq"]["mlp/none=0"]
    assert stats["disagreement_with_unshifted"][0] <= 0.01
