"""The experiment grid's configuration and records: what defines a grid, and how a run's record
is written to JSON. The runner writes records, the report reads them; both read the config here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .data import mnist1d_available

Record = dict[str, Any]


@dataclass
class ExperimentConfig:
    """Everything that defines a grid. `cells` lists (dataset, subsample, arch) for regime 1."""

    name: str = "default"
    cells: list[tuple[str, float, str]] = field(default_factory=list)
    seeds: int = 5
    sweep_seeds: int = 2  # seeds 0..sweep_seeds-1 run every strength; the selected ones run all seeds
    epochs: int = 50  # for digits; datasets with more data use `epochs_large`
    epochs_large: int = 25
    batch_size: int = 64
    lr_sgd: float = 0.05
    lr_adam: float = 1e-3
    strengths: dict[str, list[float]] = field(default_factory=dict)  # arm -> grid (SGD)
    arch_strengths: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # per-arch override
    adam_strengths: dict[str, list[float]] = field(default_factory=dict)  # arm -> grid (Adam)
    guard_cells: list[str] = field(default_factory=list)  # archs (digits) that also run log_guard
    # extra, strong strengths for the guard cells: where does each form collapse, does the guard help?
    probe_strengths: dict[str, list[float]] = field(default_factory=dict)
    adam_archs: list[str] = field(default_factory=list)  # digits archs for regime 3
    shift_archs: list[str] = field(default_factory=list)  # digits archs for regimes 2 and 4
    shifts: int = 3  # random shifts per initial function (plus the unshifted one)
    arch_shifts: dict[str, int] = field(default_factory=dict)  # per-arch override of `shifts`
    equivariant_archs: list[str] = field(default_factory=list)  # digits archs for regime 2b
    equivariant_strengths: dict[str, float] = field(default_factory=dict)  # extra (strong) arms for 2b
    shift_decades: float = 1.5  # log10 g_l uniform in [-d, d], recentred: up to 3 decades apart
    finetune_epochs: int = 15
    finetune_lr: float = 0.01
    eps: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05, 0.1])
    pgd_steps: int = 20
    device: str = "cpu"
    workers: int = 2
    implementation: str = "auto"  # invariant penalty: auto | shared | local
    output: str = "docs/results"  # raw JSON + plots; the Markdown goes to `markdown`
    markdown: str = "docs/results.md"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shifts_for(self, arch: str) -> int:
        return self.arch_shifts.get(arch, self.shifts)

    def strengths_for(self, arch: str) -> dict[str, list[float]]:
        return {**self.strengths, **self.arch_strengths.get(arch, {})}


SGD_STRENGTHS = {
    "wd": [1e-4, 5e-4, 2e-3],
    "log": [2e-3, 6e-3, 2e-2],
    "balanced": [5e-5, 2e-4, 8e-4],
}
ADAM_STRENGTHS = {
    "wd": [1e-2, 1e-1, 5e-1],  # AdamW's decoupled decay (multiplied by the learning rate)
    "log": [5e-4, 2e-3, 6e-3],
    "balanced": [2e-5, 5e-5, 2e-4],
}
PROBE_STRENGTHS = {"wd": [8e-3], "log": [6e-2, 2e-1], "balanced": [3e-3]}
RESNET_STRENGTHS = {"wd": [1e-4, 1e-3], "log": [2e-3, 2e-2], "balanced": [5e-5, 5e-4]}


def default_config() -> ExperimentConfig:
    """The default grid: sized for about 15 minutes on 2 otherwise idle CPU cores."""
    cells = [("digits", 1.0, a) for a in ("mlp", "vgg", "resnet_nobn", "resnet_bn")]
    cells += [("digits", 0.2, a) for a in ("mlp", "vgg")]
    if mnist1d_available():
        cells += [("mnist1d", 1.0, "mlp")]
    return ExperimentConfig(
        name="default",
        cells=cells,
        epochs=40,
        epochs_large=20,
        strengths=dict(SGD_STRENGTHS),
        arch_strengths={"resnet_nobn": dict(RESNET_STRENGTHS), "resnet_bn": dict(RESNET_STRENGTHS)},
        adam_strengths=dict(ADAM_STRENGTHS),
        guard_cells=["mlp"],
        probe_strengths=dict(PROBE_STRENGTHS),
        adam_archs=["mlp"],
        shift_archs=["mlp", "vgg"],
        arch_shifts={"vgg": 2},
        equivariant_archs=["mlp", "vgg"],
        equivariant_strengths={"wd": 2e-3, "log": 2e-2, "balanced": 2e-4},
    )


def quick_config() -> ExperimentConfig:
    """A smoke test (about 1-2 minutes): every regime, tiny grid, 2 seeds, few epochs."""
    return ExperimentConfig(
        name="quick",
        cells=[("digits", 1.0, "mlp"), ("digits", 0.2, "vgg")],
        seeds=2,
        sweep_seeds=1,
        epochs=15,
        epochs_large=5,
        strengths={"wd": [5e-4], "log": [6e-3], "balanced": [2e-4]},
        adam_strengths={"wd": [1e-2], "log": [6e-3], "balanced": [2e-4]},
        guard_cells=["mlp"],
        probe_strengths={"log": [2e-1]},
        adam_archs=["mlp"],
        shift_archs=["mlp"],
        shifts=2,
        equivariant_archs=["mlp"],
        equivariant_strengths={"wd": 2e-3},
        finetune_epochs=3,
        eps=[0.0, 0.05],
        pgd_steps=5,
        output="build/experiment-quick",
        markdown="build/experiment-quick/results.md",
    )


def large_config(device: str) -> ExperimentConfig:
    """A larger grid for a GPU machine (4 processes share the GPU): 10 seeds, 60 epochs, more cells.
    Not run in this project so far (no GPU was available)."""
    config = default_config()
    cells = [*config.cells, ("digits", 0.2, "resnet_nobn"), ("digits", 0.2, "resnet_bn")]
    if mnist1d_available():
        cells.append(("mnist1d", 1.0, "vgg"))
    return replace(
        config,
        name="large",
        cells=cells,
        epochs=60,
        epochs_large=30,
        seeds=10,
        sweep_seeds=3,
        device=device,
        workers=4,
        shifts=6,
        arch_shifts={},
        arch_strengths={},
        adam_archs=["mlp", "vgg", "resnet_nobn"],
        shift_archs=["mlp", "vgg"],
        guard_cells=["mlp", "vgg"],
    )


def public_record(record: Record) -> Record:
    """A record for JSON: private keys dropped, floats rounded."""

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, 5) if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    # the attack settings are the same in every record: they are kept once, in summary.json
    return {k: clean(v) for k, v in record.items() if not k.startswith("_") and k != "attack"}
