"""The experiment grid: training runs, measures, strength selection on validation, and the
four regimes (science.md s.8):

1. `sgd`: standard init, SGD; every arm swept over a strength grid.
2. `shift`: one initial function under several random function-preserving layer shifts, trained
   with each arm (strengths selected in regime 1); how much does the outcome depend on the shift?
3. `adam`: Adam / AdamW (decoupled decay) vs Adam + the invariant regularizer, each swept.
4. `finetune`: a trained model is fine-tuned with each arm from its own parametrization and from
   function-preserving shifts of it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..analysis.verify import random_log10_factors
from ..analysis.weights import shift_layers
from ..auditing import analyze
from .architectures import Normalized, build_model
from .arms import Arm, local_penalty, make_optimizer, make_penalty, weight_decay_penalty
from .attacks import evaluate_robustness
from .config import ExperimentConfig, Record, public_record
from .data import Dataset, load_dataset

# --------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class RunSpec:
    regime: str
    dataset: str
    subsample: float
    arch: str
    arm: str
    strength: float
    optimizer: str
    seed: int
    shift: int = -1  # -1: unshifted; otherwise the seed of the random shift


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def epochs_for(config: ExperimentConfig, data: Dataset) -> int:
    return config.epochs if len(data.y_train) <= 1500 else config.epochs_large


def initial_model(spec: RunSpec, data: Dataset, device: str) -> Normalized:
    """The seeded initial model (the same function for every arm and shift of one seed)."""
    _seed_all(spec.seed)
    return build_model(spec.arch, data.input_shape, data.classes, data.mean, data.std).to(device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def chain_layers(model: Normalized, example: torch.Tensor) -> list[list[Any]]:
    """WeightLayers of every multi-layer chain of the model's network."""
    structure = analyze(model.net, (example,), verify=False).structure
    return [chain.layers for chain in structure.chains if len(chain.layers) > 1]


def apply_shift(model: Normalized, example: torch.Tensor, shift_seed: int, decades: float) -> list[float]:
    """Apply a random function-preserving weight scale shift to every chain; returns all log10 g_l."""
    rng = random.Random(10_000 + shift_seed)
    state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    overrides: dict[str, torch.Tensor] = {}
    factors: list[float] = []
    for layers in chain_layers(model, example.to(_device_of(model))):
        log_g = random_log10_factors(len(layers), rng, decades)
        factors += log_g
        overrides.update(shift_layers(layers, log_g, state))
    device = next(model.parameters()).device
    model.net.load_state_dict(
        {k: v.to(dtype=state[k].dtype, device=device) for k, v in overrides.items()}, strict=False
    )
    return factors


def equivariant_lr_scales(model: Normalized, example: torch.Tensor, factors: list[float]) -> dict[str, float]:
    """Per-parameter learning-rate multipliers that make SGD (with momentum) exactly equivariant
    to the shift `factors` (as applied by `apply_shift`): g_l^2 for W_l and c_l^2 for b_l. Then
    the shifted run's trajectory is the shift of the unshifted run's, for the loss and for any
    shift-invariant penalty, but not for weight decay (its gradient scales like g_l, not 1/g_l)."""
    scales: dict[str, float] = {}
    index = 0
    for layers in chain_layers(model, example.to(_device_of(model))):
        cumulative = 0.0
        for position, layer in enumerate(layers):
            log_g = factors[index]
            index += 1
            cumulative += log_g
            log_c = 0.0 if position == len(layers) - 1 else cumulative
            scales[f"net.{layer.weight}"] = 10.0 ** (2 * log_g)
            if layer.bias:
                scales[f"net.{layer.bias}"] = 10.0 ** (2 * log_c)
    return scales


def _scale_param_groups(model: nn.Module, optimizer: torch.optim.Optimizer, scales: dict[str, float]) -> None:
    """Split the optimizer's parameter groups so that each scaled parameter gets lr * scale."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale = scales.get(names[id(param)], 1.0)
            groups.append(
                {**{k: v for k, v in group.items() if k != "params"}, "params": [param], "lr": group["lr"] * scale}
            )
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)


def train(
    model: nn.Module,
    data: Dataset,
    arm: Arm,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    implementation: str,
    device: str,
    cosine: bool = True,
    lr_scales: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Mini-batch training on cross-entropy + the arm's penalty; stops on a non-finite loss.
    `lr_scales`: per-parameter learning-rate multipliers (see `equivariant_lr_scales`)."""
    optimizer = make_optimizer(model, arm, lr)
    if lr_scales:
        _scale_param_groups(model, optimizer, lr_scales)
    penalty, source = make_penalty(model, data.x_train[:2].to(device), arm, implementation)
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch) if cosine else None
    generator = torch.Generator().manual_seed(seed)
    x, y = data.x_train.to(device), data.y_train.to(device)
    diverged, last_loss = False, float("nan")
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator).to(device)
        for index in range(0, len(y), batch_size):
            batch = order[index : index + batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            if penalty is not None:
                loss = loss + penalty()
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            last_loss = float(loss.detach())
        if diverged:
            break
    model.eval()
    return {
        "train_seconds": time.perf_counter() - start,
        "diverged": diverged,
        "final_loss": last_loss,
        "penalty_implementation": source,
    }


def audit_measures(model: Normalized, example: torch.Tensor) -> dict[str, Any]:
    """log10 intrinsic norm, imbalance, input-gradient bound and layer norms, from the audit."""
    net = model.net
    analysis = analyze(net, (example.to(_device_of(net)),), verify=False)
    report = analysis.report.to_dict()
    chains = [c for c in report["chains"] if len(c["weights"]) > 1]
    layer_logs = [layer["log10_frobenius"] for layer in report["layers"]]
    finite = [v for v in layer_logs if v is not None and math.isfinite(v)]
    intrinsic = [c["log10_intrinsic_norm"] for c in report["chains"] if c["log10_intrinsic_norm"] is not None]
    return {
        "log10_intrinsic_norm": sum(intrinsic) if intrinsic else None,  # sum over all chains
        "max_imbalance_decades": report["summary"]["max_imbalance_decades"],
        "log10_input_gradient_bound": report["summary"]["gradient"]["log10_frobenius_bound"],
        "min_layer_log10_norm": min(finite) if finite else None,
        "chain_log10_intrinsic_norms": [round(c["log10_intrinsic_norm"], 4) for c in chains],
        "weight_decay_penalty": weight_decay_penalty(net),
    }


def is_collapsed(record: Record, classes: int) -> bool:
    """Accuracy within 10 points of chance, a non-finite loss, or a layer norm below 1e-3."""
    low_accuracy = record["test_accuracy"] <= 1.0 / classes + 0.10
    tiny_layer = record.get("min_layer_log10_norm") is not None and record["min_layer_log10_norm"] < -3
    return bool(record.get("diverged") or low_accuracy or tiny_layer)


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(x).argmax(dim=1).cpu()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predictions(model, x) == y.cpu()).float().mean())


def measure(model: Normalized, data: Dataset, config: ExperimentConfig, seed: int, full: bool = True) -> Record:
    """Validation/test accuracy, robustness (FGSM/PGD at every eps), input-gradient norm, audit."""
    device = config.device
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    record: Record = {"val_accuracy": accuracy(model, data.x_val.to(device), data.y_val)}
    eps = config.eps if full else [e for e in config.eps if e in (0.0, 0.05)]
    robust = evaluate_robustness(model, x_test, y_test, eps, config.pgd_steps, seed=seed)
    record["test_accuracy"] = robust.pop("clean_accuracy")
    record.update(robust)
    record.update(audit_measures(model, data.x_train[:2]))
    return record


def run_one(spec: RunSpec, config: ExperimentConfig) -> Record:
    """Regimes 1-3: build (and for `shift`, shift) the seeded model, train it with the arm, measure."""
    data = load_dataset(spec.dataset, spec.subsample)
    model = initial_model(spec, data, config.device)
    factors: list[float] = []
    shifted_imbalance = None
    if spec.shift >= 0:
        factors = apply_shift(model, data.x_train[:2], spec.shift, config.shift_decades)
        shifted_imbalance = audit_measures(model, data.x_train[:2])["max_imbalance_decades"]
    arm = Arm(spec.arm, spec.strength, spec.optimizer)
    lr = config.lr_sgd if spec.optimizer == "sgd" else config.lr_adam
    scales = equivariant_lr_scales(model, data.x_train[:2], factors) if spec.regime == "shift_eq" and factors else None
    info = train(
        model,
        data,
        arm,
        epochs_for(config, data),
        lr,
        config.batch_size,
        spec.seed,
        config.implementation,
        config.device,
        lr_scales=scales,
    )
    record: Record = {**asdict(spec), "dataset": data.name, "base_dataset": spec.dataset, **info}
    record.update(measure(model, data, config, spec.seed, full=spec.regime not in ("shift", "shift_eq")))
    record["collapsed"] = is_collapsed(record, data.classes)
    record["shift_log10_factors"] = [round(f, 4) for f in factors]
    record["imbalance_after_shift"] = shifted_imbalance
    if spec.regime in ("shift", "shift_eq"):
        record["_predictions"] = predictions(model, data.x_test.to(config.device)).tolist()
    return record


def train_unregularized(model: Normalized, data: Dataset, config: ExperimentConfig, seed: int) -> None:
    """The plain SGD run that regime 4 fine-tunes from and the core demo shifts."""
    train(
        model,
        data,
        Arm("none"),
        epochs_for(config, data),
        config.lr_sgd,
        config.batch_size,
        seed,
        config.implementation,
        config.device,
    )


def run_finetune(seed: int, arch: str, arms: list[Arm], config: ExperimentConfig) -> list[Record]:
    """Regime 4: train a base model (no regularizer, SGD), then fine-tune copies of it, unshifted
    and after `config.shifts` random function-preserving shifts, with every arm."""
    data = load_dataset("digits", 1.0)
    base = initial_model(RunSpec("finetune", "digits", 1.0, arch, "none", 0.0, "sgd", seed), data, config.device)
    train_unregularized(base, data, config, seed)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    x_test = data.x_test.to(config.device)
    base_predictions = predictions(base, x_test)
    base_accuracy = accuracy(base, x_test, data.y_test)
    records: list[Record] = []
    for arm in arms:
        reference: torch.Tensor | None = None
        for shift in [-1, *range(config.shifts)]:
            model = build_model(arch, data.input_shape, data.classes, data.mean, data.std).to(config.device)
            model.load_state_dict(base_state)
            factors = apply_shift(model, data.x_train[:2], shift, config.shift_decades) if shift >= 0 else []
            with torch.no_grad():
                before = predictions(model, x_test)
            info = train(
                model,
                data,
                arm,
                config.finetune_epochs,
                config.finetune_lr,
                config.batch_size,
                seed + 1000,
                config.implementation,
                config.device,
                cosine=False,
            )
            record: Record = {
                "regime": "finetune",
                "dataset": data.name,
                "subsample": 1.0,
                "arch": arch,
                "arm": arm.name,
                "strength": arm.strength,
                "optimizer": arm.optimizer,
                "seed": seed,
                "shift": shift,
                **info,
                "base_test_accuracy": base_accuracy,
                "shift_changed_predictions": float((before != base_predictions).float().mean()),
                "shift_log10_factors": [round(f, 4) for f in factors],
            }
            record.update(measure(model, data, config, seed, full=False))
            final = predictions(model, x_test)
            if shift < 0:
                reference = final
            assert reference is not None
            record["disagreement_with_unshifted"] = float((final != reference).float().mean())
            record["disagreement_with_base"] = float((final != base_predictions).float().mean())
            record["collapsed"] = is_collapsed(record, data.classes)
            records.append(record)
    return records


def core_demo(config: ExperimentConfig, seed: int = 0) -> Record:
    """The core argument on a trained deep MLP (digits): a random shift leaves the outputs unchanged,
    changes the weight-decay penalty, and leaves the invariant penalties unchanged."""
    data = load_dataset("digits", 1.0)
    spec = RunSpec("demo", "digits", 1.0, "mlp", "none", 0.0, "sgd", seed)
    model = initial_model(spec, data, config.device)
    train_unregularized(model, data, config, seed)
    model = model.cpu().double()
    x = data.x_test.double()
    example = data.x_train[:2].double()
    penalties: dict[str, Callable[[], torch.Tensor]] = {}
    for form in ("log", "balanced"):
        penalties[f"local_{form}"] = local_penalty(model.net, example, form, 1.0)
        shared, source = make_penalty(model, example, Arm(form, 1.0), "auto")
        if source == "shared" and shared is not None:
            penalties[f"shared_{form}"] = shared
    with torch.no_grad():
        before_logits = model(x)
        before = {name: float(p()) for name, p in penalties.items()}
        wd_before = weight_decay_penalty(model.net)
        imbalance_before = audit_measures(model, example)["max_imbalance_decades"]
    factors = apply_shift(model, example, shift_seed=123, decades=config.shift_decades)
    with torch.no_grad():
        after_logits = model(x)
        after = {name: float(p()) for name, p in penalties.items()}
        wd_after = weight_decay_penalty(model.net)
        imbalance_after = audit_measures(model, example)["max_imbalance_decades"]
    return {
        "model": "7-layer ReLU MLP, trained on digits (no regularizer), float64",
        "log10_factors": [round(f, 4) for f in factors],
        "max_abs_logit_change": float((after_logits - before_logits).abs().max()),
        "max_abs_logit": float(before_logits.abs().max()),
        "weight_decay_penalty": {"before": wd_before, "after": wd_after, "factor": wd_after / wd_before},
        "imbalance_decades": {"before": imbalance_before, "after": imbalance_after},
        "invariant_penalties": {
            name: {
                "before": before[name],
                "after": after[name],
                "relative_change": abs(after[name] - before[name]) / max(abs(before[name]), 1e-300),
            }
            for name in penalties
        },
    }


# --------------------------------------------------------------------------------------------
# The grid


def _worker_init() -> None:
    torch.set_num_threads(1)


def _execute(task: tuple[str, Any, ExperimentConfig]) -> list[Record] | Record:
    kind, payload, config = task
    if kind == "run":
        return run_one(payload, config)
    if kind == "finetune":
        seed, arch, arms = payload
        return run_finetune(seed, arch, arms, config)
    if kind == "demo":
        return core_demo(config)
    raise ValueError(kind)


def _map(
    tasks: list[tuple[str, Any, ExperimentConfig]], config: ExperimentConfig, progress: Callable[[str], None]
) -> list[Any]:
    """Run tasks in `config.workers` processes (1: in this process); results in task order."""
    results: list[Any] = [None] * len(tasks)
    start = time.perf_counter()
    if config.workers <= 1:
        for index, task in enumerate(tasks):
            results[index] = _execute(task)
            progress(f"{index + 1}/{len(tasks)} tasks, {time.perf_counter() - start:.0f}s")
        return results
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(_execute, task): index for index, task in enumerate(tasks)}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if done % max(1, len(tasks) // 20) == 0 or done == len(tasks):
                progress(f"{done}/{len(tasks)} tasks, {time.perf_counter() - start:.0f}s")
    return results


def sgd_specs(config: ExperimentConfig, seeds: Iterable[int]) -> list[RunSpec]:
    """Regime 1: every cell x arm x strength (the sweep) for `seeds`."""
    specs = []
    for dataset, subsample, arch in config.cells:
        grids = config.strengths_for(arch)
        arms = [("none", 0.0)] + [(a, s) for a, grid in grids.items() for s in grid]
        if dataset == "digits" and subsample == 1.0 and arch in config.guard_cells:
            arms += [(a, s) for a, grid in config.probe_strengths.items() for s in grid]
            log_grid = grids.get("log", []) + config.probe_strengths.get("log", [])
            arms += [("log_guard", s) for s in log_grid]
        for arm, strength in arms:
            for seed in seeds:
                specs.append(RunSpec("sgd", dataset, subsample, arch, arm, strength, "sgd", seed))
    return specs


def adam_specs(config: ExperimentConfig, seeds: Iterable[int]) -> list[RunSpec]:
    """Regime 3: Adam / AdamW / Adam + invariant penalty, swept, on digits, for `seeds`."""
    arms = [("none", 0.0)] + [(a, s) for a, grid in config.adam_strengths.items() for s in grid]
    return [
        RunSpec("adam", "digits", 1.0, arch, arm, strength, "adam", seed)
        for arch in config.adam_archs
        for arm, strength in arms
        for seed in seeds
    ]


_COST = {"resnet_bn": 5, "resnet_nobn": 5, "vgg": 4, "mlp": 1}


def _cost(task: tuple[str, Any, ExperimentConfig]) -> float:
    """Rough relative cost, to start the long tasks first."""
    kind, payload, _ = task
    if kind == "finetune":
        return 20 * _COST.get(payload[1], 1)
    if kind == "run":
        return _COST.get(payload.arch, 1) * (0.3 if payload.subsample < 1 else 1)
    return 1.0


def cell_key(record: Record) -> tuple[str, str, str]:
    return (record["regime"], record["dataset"], record["arch"])


def select_strengths(records: Iterable[Record]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per (regime, dataset, arch) and arm: the strength with the best mean validation accuracy
    over seeds (ties: the smaller strength). Test accuracy is never looked at."""
    by_cell: dict[tuple[str, str, str], dict[str, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in records:
        by_cell[cell_key(r)][r["arm"]][r["strength"]].append(r["val_accuracy"])
    selected: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, arms in by_cell.items():
        selected[key] = {arm: min(grid, key=lambda s: (-statistics.fmean(grid[s]), s)) for arm, grid in arms.items()}
    return selected


def equivariant_tasks(
    config: ExperimentConfig, selection: dict[tuple[str, str, str], dict[str, float]]
) -> list[tuple[str, Any, ExperimentConfig]]:
    """Regime 2b: the regime-2 shifts trained with shift-equivariant per-layer learning rates, with
    the regime-1 selected strengths and `config.equivariant_strengths`."""
    tasks: list[tuple[str, Any, ExperimentConfig]] = []
    for arch in config.equivariant_archs:
        chosen = selection.get(("sgd", "digits", arch), {})
        arms = {("none", 0.0)} | {(a, chosen[a]) for a in ("wd", "log", "balanced") if a in chosen}
        arms |= set(config.equivariant_strengths.items())
        shifted = replace(config, shifts=config.shifts_for(arch))
        for seed in range(config.seeds):
            for arm, strength in sorted(arms):
                for shift in [-1, *range(shifted.shifts)]:
                    spec = RunSpec("shift_eq", "digits", 1.0, arch, arm, strength, "sgd", seed, shift)
                    tasks.append(("run", spec, shifted))
    return tasks


def add_equivariant_regime(config: ExperimentConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run only regime 2b and merge it into the last run's results (raw dump + summary.json)."""
    from .report import dump_raw, rebuild

    start = time.perf_counter()
    raw_path = Path("build") / f"experiment-raw-{config.name}.json"
    raw = json.loads(raw_path.read_text())
    selection = {tuple(k): v for k, v in raw["selection"]}
    runs = [r for r in raw["runs"] if r["regime"] != "shift_eq"]
    tasks = equivariant_tasks(config, selection)  # type: ignore[arg-type]
    progress(f"regime 2b: {len(tasks)} tasks")
    runs += _map(sorted(tasks, key=_cost, reverse=True), config, progress)
    dump_raw(runs, selection, config)  # type: ignore[arg-type]
    summary_path = Path(config.output) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["seconds"] += time.perf_counter() - start
    summary["config"] = config.to_dict()
    summary_path.write_text(json.dumps(summary, default=str))
    return rebuild(raw_path, summary_path, config)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_experiments(
    config: ExperimentConfig, progress: Callable[[str], None] = print, write: bool = True
) -> dict[str, Any]:
    """Run the whole grid; with `write`, save raw JSON and plots to `config.output` and the tables
    to `config.markdown`. Returns {config, machine, runs, selection, analysis, demo, seconds}."""
    start = time.perf_counter()
    if config.device != "cpu" or config.workers <= 1:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    for dataset, subsample, _ in config.cells:
        load_dataset(dataset, subsample)
    sweep_seeds = range(min(config.sweep_seeds, config.seeds))
    phase_a: list[tuple[str, Any, ExperimentConfig]] = [("demo", None, config)]
    phase_a += [("run", spec, config) for spec in sgd_specs(config, sweep_seeds) + adam_specs(config, sweep_seeds)]
    phase_a.sort(key=_cost, reverse=True)
    progress(f"phase A: {len(phase_a)} tasks (regime 1 and 3 sweeps on seeds {list(sweep_seeds)}, core demo)")
    results_a = _map(phase_a, config, progress)
    demo = next(r for task, r in zip(phase_a, results_a) if task[0] == "demo")
    runs = [r for task, r in zip(phase_a, results_a) if task[0] == "run"]
    selection = select_strengths(runs)  # validation accuracy of the sweep seeds only

    phase_b: list[tuple[str, Any, ExperimentConfig]] = []
    more_seeds = range(len(sweep_seeds), config.seeds)
    for spec in sorted(
        {
            (r["regime"], r["base_dataset"], r["subsample"], r["arch"], r["arm"], r["strength"], r["optimizer"])
            for r in runs
        }
    ):
        regime, dataset, subsample, arch, arm, strength, _ = spec
        if selection[(regime, load_dataset(dataset, subsample).name, arch)].get(arm) == strength:
            phase_b += [("run", RunSpec(*spec, seed), config) for seed in more_seeds]  # type: ignore[misc]
    for arch in config.shift_archs:
        chosen = selection.get(("sgd", "digits", arch), {})
        arms = [Arm("none")] + [Arm(a, chosen[a]) for a in ("wd", "log", "balanced") if a in chosen]
        shifted = replace(config, shifts=config.shifts_for(arch))
        for seed in range(config.seeds):
            for arm in arms:
                for shift in [-1, *range(shifted.shifts)]:
                    spec = RunSpec("shift", "digits", 1.0, arch, arm.name, arm.strength, "sgd", seed, shift)
                    phase_b.append(("run", spec, shifted))
            phase_b.append(("finetune", (seed, arch, arms), shifted))
    phase_b += equivariant_tasks(config, selection)
    phase_b.sort(key=_cost, reverse=True)
    progress(
        f"phase B: {len(phase_b)} tasks (selected arms on seeds {list(more_seeds)}, regime 2 shifts, "
        "regime 4 fine-tuning)"
    )
    for result in _map(phase_b, config, progress):
        runs.extend(result if isinstance(result, list) else [result])

    from .report import analyse, write_outputs

    attack = next((r["attack"] for r in runs if "attack" in r), None)
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "attack": attack,
        "machine": machine_info(),
        "demo": demo,
        "selection": {"/".join(k): v for k, v in selection.items()},
        "seconds": time.perf_counter() - start,
    }
    results["analysis"] = analyse(runs, selection, config)
    results["runs"] = [public_record(r) for r in runs]
    if write:
        write_outputs(results, config)
    progress(f"done in {results['seconds']:.0f}s")
    return results


def save_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=False) + "\n")
