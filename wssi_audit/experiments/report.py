"""Summaries (means, stds, paired bootstrap intervals), plots and the Markdown tables of a grid."""

from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, public_record

Record = dict[str, Any]
BEGIN, END = "<!-- BEGIN GENERATED RESULTS -->", "<!-- END GENERATED RESULTS -->"
ARM_ORDER = ("none", "wd", "log", "balanced", "log_guard")
ARM_COLORS = {"none": "#888888", "wd": "#1f77b4", "log": "#d62728", "balanced": "#2ca02c", "log_guard": "#ff7f0e"}


def _cell_grid(count: int) -> tuple[Any, Any]:
    """One small panel per cell, four to a row."""
    import matplotlib.pyplot as plt

    columns = min(4, count)
    rows = (count + columns - 1) // columns
    return plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)


def _label_grid(axes_grid: Any, used: int, ylabel: str) -> None:
    for ax in list(axes_grid.flat)[used:]:
        ax.axis("off")
    axes_grid[0][0].set_ylabel(ylabel)
    axes_grid[0][0].legend(fontsize=6)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over paired seeds and its 95 % percentile bootstrap interval."""
    diffs = [x - y for x, y in zip(a, b)]
    if not diffs:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return {
        "mean": statistics.fmean(diffs),
        "low": means[int(0.025 * resamples)],
        "high": means[int(0.975 * resamples) - 1],
        "n": len(diffs),
    }


def middle_eps(config: ExperimentConfig) -> str:
    nonzero = [e for e in config.eps if e > 0]
    return f"{nonzero[len(nonzero) // 2] if nonzero else 0:g}"


def _group(records: list[Record], *keys: str) -> dict[tuple[Any, ...], list[Record]]:
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def _arm_stats(rs: list[Record], eps: list[str]) -> dict[str, Any]:
    rs = sorted(rs, key=lambda r: r["seed"])
    stats: dict[str, Any] = {"seeds": len(rs), "collapsed": sum(bool(r["collapsed"]) for r in rs)}
    for name, getter in [
        ("test_accuracy", lambda r: r["test_accuracy"]),
        ("val_accuracy", lambda r: r["val_accuracy"]),
        ("input_gradient_norm", lambda r: r["input_gradient_norm"]),
        ("log10_intrinsic_norm", lambda r: r["log10_intrinsic_norm"]),
        ("max_imbalance_decades", lambda r: r["max_imbalance_decades"]),
        ("train_seconds", lambda r: r["train_seconds"]),
    ]:
        values = [getter(r) for r in rs if getter(r) is not None]
        stats[name] = mean_std(values)
    for e in eps:
        stats[f"fgsm_{e}"] = mean_std([r["fgsm"][e] for r in rs])
        stats[f"pgd_{e}"] = mean_std([r["pgd"][e] for r in rs])
    return stats


def analyse_sweep(
    runs: list[Record], regime: str, selection: dict[tuple[str, str, str], dict[str, float]], config: ExperimentConfig
) -> dict[str, Any]:
    """Per cell: the sweep (every arm x strength) and the selected arms with paired bootstraps."""
    eps = [f"{e:g}" for e in config.eps if e > 0]
    mid = middle_eps(config)
    cells: dict[str, Any] = {}
    for (dataset, arch), rs in _group([r for r in runs if r["regime"] == regime], "dataset", "arch").items():
        sweep = {
            f"{arm}={strength:g}": _arm_stats(group, eps)
            for (arm, strength), group in sorted(
                _group(rs, "arm", "strength").items(), key=lambda kv: (ARM_ORDER.index(kv[0][0]), kv[0][1])
            )
        }
        chosen = selection.get((regime, dataset, arch), {})
        selected: dict[str, Any] = {}
        per_seed: dict[str, list[Record]] = {}
        for arm in ARM_ORDER:
            if arm not in chosen:
                continue
            group = sorted([r for r in rs if r["arm"] == arm and r["strength"] == chosen[arm]], key=lambda r: r["seed"])
            per_seed[arm] = group
            selected[arm] = {"strength": chosen[arm], **_arm_stats(group, eps)}
        comparisons = {}
        if "wd" in per_seed:
            for arm in ("log", "balanced", "log_guard"):
                if arm not in per_seed:
                    continue
                a, b = per_seed[arm], per_seed["wd"]
                comparisons[f"{arm}-wd"] = {
                    "test_accuracy": paired_bootstrap([r["test_accuracy"] for r in a], [r["test_accuracy"] for r in b]),
                    f"pgd_{mid}": paired_bootstrap([r["pgd"][mid] for r in a], [r["pgd"][mid] for r in b]),
                }
        cells[f"{dataset}/{arch}"] = {"sweep": sweep, "selected": selected, "comparisons": comparisons}
    return cells


def analyse_shift(runs: list[Record], regime: str = "shift") -> dict[str, Any]:
    """Regime 2 (`shift`, or `shift_eq` with equivariant learning rates): per arch, arm and
    strength, how much the outcome varies across shifts of one function."""
    out: dict[str, Any] = {}
    selected = [r for r in runs if r["regime"] == regime]
    for (arch, arm, strength), rs in _group(selected, "arch", "arm", "strength").items():
        spreads, ranges, disagreements, pgd_spreads, accuracies = [], [], [], [], []
        for _, group in _group(rs, "seed").items():
            accs = [r["test_accuracy"] for r in group]
            spreads.append(statistics.pstdev(accs))
            ranges.append(max(accs) - min(accs))
            pgd_values = [r["pgd"][max(r["pgd"], key=float)] for r in group]
            pgd_spreads.append(statistics.pstdev(pgd_values))
            accuracies.extend(accs)
            reference = next((r for r in group if r["shift"] < 0), None)
            if reference is not None and "_predictions" in reference:
                ref = reference["_predictions"]
                for r in group:
                    if r["shift"] >= 0 and "_predictions" in r:
                        disagreements.append(sum(p != q for p, q in zip(r["_predictions"], ref)) / len(ref))
        out[f"{arch}/{arm}" if regime == "shift" else f"{arch}/{arm}={strength:g}"] = {
            "arch": arch,
            "arm": arm,
            "strength": strength,
            "runs": len(rs),
            "collapsed": sum(bool(r["collapsed"]) for r in rs),
            "test_accuracy": mean_std(accuracies),
            "within_function_std": mean_std(spreads),
            "within_function_range": mean_std(ranges),
            "within_function_pgd_std": mean_std(pgd_spreads),
            "disagreement_with_unshifted": mean_std(disagreements),
            "final_imbalance": mean_std([r["max_imbalance_decades"] for r in rs if r["shift"] >= 0]),
            "log10_intrinsic_norm_std_across_shifts": mean_std(
                [
                    statistics.pstdev([r["log10_intrinsic_norm"] for r in group])
                    for _, group in _group(rs, "seed").items()
                ]
            ),
            "unshifted_final_imbalance": mean_std([r["max_imbalance_decades"] for r in rs if r["shift"] < 0]),
        }
    return out


def analyse_finetune(runs: list[Record]) -> dict[str, Any]:
    """Regime 4: fine-tuning from the trained parametrization vs from shifts of it."""
    out: dict[str, Any] = {}
    for (arch, arm), rs in _group([r for r in runs if r["regime"] == "finetune"], "arch", "arm").items():
        unshifted = [r for r in rs if r["shift"] < 0]
        shifted = [r for r in rs if r["shift"] >= 0]
        gaps = []
        for _, group in _group(rs, "seed").items():
            ref = next(r for r in group if r["shift"] < 0)
            gaps += [abs(r["test_accuracy"] - ref["test_accuracy"]) for r in group if r["shift"] >= 0]
        out[f"{arch}/{arm}"] = {
            "arch": arch,
            "arm": arm,
            "strength": rs[0]["strength"],
            "base_test_accuracy": mean_std([r["base_test_accuracy"] for r in unshifted]),
            "unshifted_test_accuracy": mean_std([r["test_accuracy"] for r in unshifted]),
            "shifted_test_accuracy": mean_std([r["test_accuracy"] for r in shifted]),
            "abs_accuracy_gap": mean_std(gaps),
            "disagreement_with_unshifted": mean_std([r["disagreement_with_unshifted"] for r in shifted]),
            "unshifted_disagreement_with_base": mean_std([r["disagreement_with_base"] for r in unshifted]),
            "shifted_disagreement_with_base": mean_std([r["disagreement_with_base"] for r in shifted]),
            "shift_changed_predictions_max": max((r["shift_changed_predictions"] for r in shifted), default=0.0),
            "collapsed": sum(bool(r["collapsed"]) for r in rs),
            "runs": len(rs),
            "shifted_final_imbalance": mean_std([r["max_imbalance_decades"] for r in shifted]),
        }
    return out


def dump_raw(
    runs: list[Record],
    selection: dict[tuple[str, str, str], dict[str, float]],
    config: ExperimentConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Every record (predictions included) to build/experiment-raw-<grid>.json, so the tables and
    plots can be rebuilt (`rebuild`) without rerunning the grid."""
    path = Path("build") / f"experiment-raw-{config.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "config": config.to_dict(),
        "selection": [[list(k), v] for k, v in selection.items()],
        "runs": runs,
        **(extra or {}),
    }
    path.write_text(json.dumps(document, default=str))
    return path


def analyse(
    runs: list[Record],
    selection: dict[tuple[str, str, str], dict[str, float]],
    config: ExperimentConfig,
    dump: bool = True,
) -> dict[str, Any]:
    """All summaries of a grid (with `dump`, the raw records are saved first, see `dump_raw`)."""
    try:
        if dump:
            dump_raw(runs, selection, config)
    except Exception as error:
        print(f"could not save the raw records: {error}")
    collapsed = [
        {
            k: r[k]
            for k in (
                "regime",
                "dataset",
                "arch",
                "arm",
                "strength",
                "seed",
                "shift",
                "test_accuracy",
                "min_layer_log10_norm",
                "diverged",
            )
        }
        for r in runs
        if r.get("collapsed")
    ]
    return {
        "sgd": analyse_sweep(runs, "sgd", selection, config),
        "adam": analyse_sweep(runs, "adam", selection, config),
        "shift": analyse_shift(runs),
        "shift_eq": analyse_shift(runs, "shift_eq"),
        "finetune": analyse_finetune(runs),
        "collapsed_runs": collapsed,
        "penalty_implementations": sorted({r.get("penalty_implementation") or "" for r in runs} - {""}),
    }


# ------------------------------------------------------------------------------------- output


def _shift_counts(config: ExperimentConfig) -> str:
    counts = {arch: config.arch_shifts.get(arch, config.shifts) for arch in config.shift_archs}
    return ", ".join(f"{n} ({arch})" for arch, n in counts.items())


def _pct(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _num(ms: tuple[float, float], digits: int = 2) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _ci(c: dict[str, float]) -> str:
    return f"{100 * c['mean']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"


def sweep_markdown(cells: dict[str, Any], config: ExperimentConfig, title: str) -> list[str]:
    eps = [f"{e:g}" for e in config.eps if e > 0]
    mid = middle_eps(config)
    lines = [f"### {title}: selected strengths (validation), test set", ""]
    header = (
        ["cell", "arm", "strength", "test acc %"]
        + [f"PGD {e} %" for e in eps]
        + [f"FGSM {mid} %", "‖∇x CE‖", "log10 N", "imbalance (dec)", "collapsed", "train s"]
    )
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell, data in cells.items():
        for arm, s in data["selected"].items():
            row = [cell, arm, f"{s['strength']:g}" if arm != "none" else "-", _pct(s["test_accuracy"])]
            row += [_pct(s[f"pgd_{e}"]) for e in eps]
            row += [
                _pct(s[f"fgsm_{mid}"]),
                _num(s["input_gradient_norm"]),
                _num(s["log10_intrinsic_norm"]),
                _num(s["max_imbalance_decades"]),
                f"{s['collapsed']}/{s['seeds']}",
                f"{s['train_seconds'][0]:.1f}",
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Paired bootstrap (over seeds, 95 % interval) of invariant arm minus the selected weight decay, "
        f"in accuracy points (test accuracy; PGD eps={mid}):",
        "",
        "| cell | comparison | Δ test acc | Δ PGD acc |",
        "|---|---|---|---|",
    ]
    for cell, data in cells.items():
        for name, comp in data["comparisons"].items():
            lines.append(f"| {cell} | {name} | {_ci(comp['test_accuracy'])} | {_ci(comp[f'pgd_{mid}'])} |")
    lines += [
        "",
        f"<details><summary>{title}: full sweep (mean over seeds; strength selected on validation)</summary>",
        "",
        "| cell | arm | val acc % | test acc % | PGD " + mid + " % | collapsed |",
        "|---|---|---|---|---|---|",
    ]
    for cell, data in cells.items():
        for label, s in data["sweep"].items():
            lines.append(
                f"| {cell} | {label} | {_pct(s['val_accuracy'])} | {_pct(s['test_accuracy'])} | "
                f"{_pct(s[f'pgd_{mid}'])} | {s['collapsed']}/{s['seeds']} |"
            )
    lines += ["", "</details>", ""]
    return lines


def markdown(results: dict[str, Any], config: ExperimentConfig, plots: list[str]) -> str:
    a, demo, machine = results["analysis"], results["demo"], results["machine"]
    lines = [
        BEGIN,
        "",
        f"_Generated by `benchmarks/experiment.py` (grid `{config.name}`) in "
        f"{results['seconds'] / 60:.1f} min on {machine['nproc']} × {machine['cpu']}, torch {machine['torch']}"
        f"{', ' + machine['gpu'] if 'gpu' in machine else ''}; device `{config.device}`; "
        f"penalty implementation: {', '.join(a['penalty_implementations']) or 'n/a'}._",
        "",
    ]
    lines += [
        "### Core argument on a trained model",
        "",
        f"{demo['model']}; random shift with log10 g_l = {demo['log10_factors']}.",
        "",
        "| quantity | before | after | change |",
        "|---|---|---|---|",
        f"| max \\|logit\\| / max \\|Δ logit\\| | {demo['max_abs_logit']:.3g} | | {demo['max_abs_logit_change']:.2e} |",
        f"| weight-decay penalty Σ‖W‖² | {demo['weight_decay_penalty']['before']:.4g} | "
        f"{demo['weight_decay_penalty']['after']:.4g} | × {demo['weight_decay_penalty']['factor']:.3g} |",
        f"| imbalance (decades) | {demo['imbalance_decades']['before']:.3f} | "
        f"{demo['imbalance_decades']['after']:.3f} | |",
    ]
    for name, p in demo["invariant_penalties"].items():
        lines.append(
            f"| {name} penalty (strength 1) | {p['before']:.10g} | {p['after']:.10g} | "
            f"rel. {p['relative_change']:.1e} |"
        )
    lines.append("")
    lines += sweep_markdown(a["sgd"], config, "Regime 1 — standard init, SGD (momentum 0.9)")
    if a["adam"]:
        lines += sweep_markdown(a["adam"], config, "Regime 3 — Adam; `wd` = AdamW decoupled decay")
    if a["shift"]:
        lines += [
            "### Regime 2 — one function, several function-preserving shifts (digits, SGD)",
            "",
            f"Per seed: the unshifted init and {_shift_counts(config)} random shifts of it (log10 g_l uniform "
            f"in ±{config.shift_decades:g}, recentred), each trained with the arm; spread over those "
            "parametrizations (test accuracy, PGD accuracy at eps 0.05), then mean ± std over seeds.",
            "",
            "| arch | arm | strength | test acc % | std across shifts (pts) | range across shifts (pts) | "
            "PGD std (pts) | predictions ≠ unshifted % | final imbalance shifted / unshifted | collapsed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sorted(a["shift"].values(), key=lambda s: (s["arch"], ARM_ORDER.index(s["arm"]))):
            lines.append(
                f"| {s['arch']} | {s['arm']} | {s['strength']:g} | {_pct(s['test_accuracy'])} | "
                f"{_pct(s['within_function_std'])} | {_pct(s['within_function_range'])} | "
                f"{_pct(s['within_function_pgd_std'])} | {_pct(s['disagreement_with_unshifted'])} | "
                f"{s['final_imbalance'][0]:.2f} / {s['unshifted_final_imbalance'][0]:.2f} | "
                f"{s['collapsed']}/{s['runs']} |"
            )
        lines.append("")
    if a.get("shift_eq"):
        lines += [
            "### Regime 2b — the same shifts, with shift-equivariant learning rates (digits)",
            "",
            "As regime 2, but each parameter's SGD learning rate is multiplied by g_l² (weights) or c_l² "
            "(biases) of its shift, which makes SGD with momentum exactly equivariant: the shifted run "
            "follows the shift of the unshifted run, for the loss and any shift-invariant penalty. Only "
            "the regularizer can then make the outcome depend on the shift. Strengths: the ones selected "
            "in regime 1 and a stronger one.",
            "",
            "| arch | arm | strength | test acc % | std across shifts (pts) | PGD std (pts) | "
            "predictions ≠ unshifted % | std of log10 N across shifts | collapsed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sorted(a["shift_eq"].values(), key=lambda s: (s["arch"], ARM_ORDER.index(s["arm"]), s["strength"])):
            lines.append(
                f"| {s['arch']} | {s['arm']} | {s['strength']:g} | {_pct(s['test_accuracy'])} | "
                f"{_pct(s['within_function_std'])} | {_pct(s['within_function_pgd_std'])} | "
                f"{_pct(s['disagreement_with_unshifted'])} | {_num(s['log10_intrinsic_norm_std_across_shifts'], 3)} | "
                f"{s['collapsed']}/{s['runs']} |"
            )
        lines.append("")
    if a["finetune"]:
        lines += [
            "### Regime 4 — fine-tuning a trained model after a function-preserving shift (digits)",
            "",
            f"Base: trained without regularizer; fine-tuned {config.finetune_epochs} epochs, SGD lr "
            f"{config.finetune_lr:g}, from the base itself and from {_shift_counts(config)} shifts of it "
            "(the shifts change no prediction before fine-tuning).",
            "",
            "| arch | arm | strength | base acc % | fine-tuned, unshifted % | fine-tuned, shifted % | "
            "\\|acc gap\\| (pts) | predictions ≠ unshifted fine-tune % | ≠ base: unshifted / shifted % | "
            "collapsed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in sorted(a["finetune"].values(), key=lambda s: (s["arch"], ARM_ORDER.index(s["arm"]))):
            lines.append(
                f"| {s['arch']} | {s['arm']} | {s['strength']:g} | {_pct(s['base_test_accuracy'])} | "
                f"{_pct(s['unshifted_test_accuracy'])} | {_pct(s['shifted_test_accuracy'])} | "
                f"{_pct(s['abs_accuracy_gap'])} | {_pct(s['disagreement_with_unshifted'])} | "
                f"{100 * s['unshifted_disagreement_with_base'][0]:.1f} / "
                f"{100 * s['shifted_disagreement_with_base'][0]:.1f}"
                f" | {s['collapsed']}/{s['runs']} |"
            )
        lines.append("")
    collapsed = a["collapsed_runs"]
    lines += [
        "### Collapsed runs",
        "",
        f"{len(collapsed)} of {len(results['runs'])} runs collapsed "
        "(test accuracy within 10 points of chance, a non-finite loss, or a layer norm below 1e-3).",
    ]
    counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for r in collapsed:
        counts[(r["regime"], f"{r['dataset']}/{r['arch']}", r["arm"], f"{r['strength']:g}")] += 1
    if counts:
        lines += ["", "| regime | cell | arm | strength | runs |", "|---|---|---|---|---|"]
        lines += [f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {n} |" for k, n in sorted(counts.items())]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots] + ["", END]
    return "\n".join(lines)


def make_plots(results: dict[str, Any], config: ExperimentConfig, directory: Path) -> list[Path]:
    """PNG plots (matplotlib, Agg): selected arms per cell, sweeps, PGD vs eps, shift spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = results["analysis"]
    mid = middle_eps(config)
    paths: list[Path] = []
    for regime in ("sgd", "adam"):
        cells = a[regime]
        if not cells:
            continue
        fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.4 * len(cells) + 2), 6.5), sharex=True)
        names = list(cells)
        width = 0.8 / len(ARM_ORDER)
        for k, arm in enumerate(ARM_ORDER):
            for ax, metric in zip(axes, ("test_accuracy", f"pgd_{mid}")):
                xs, ys, es = [], [], []
                for i, cell in enumerate(names):
                    s = cells[cell]["selected"].get(arm)
                    if s:
                        xs.append(i + (k - len(ARM_ORDER) / 2 + 0.5) * width)
                        ys.append(100 * s[metric][0])
                        es.append(100 * s[metric][1])
                if xs:
                    ax.bar(xs, ys, width, yerr=es, label=arm, color=ARM_COLORS[arm], capsize=2)
        axes[0].set_ylabel("test accuracy %")
        axes[1].set_ylabel(f"PGD eps={mid} accuracy %")
        axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axes[0].legend(fontsize=8, ncol=len(ARM_ORDER))
        for ax in axes:
            low = min((p.get_height() for p in ax.patches), default=0)
            ax.set_ylim(max(0, low - 10), 100)
        axes[0].set_title(f"Regime {'1 (SGD)' if regime == 'sgd' else '3 (Adam)'}: selected strengths, mean ± std")
        paths.append(_save(fig, directory / f"{regime}_selected.png"))

        fig, axes_grid = _cell_grid(len(names))
        for ax, cell in zip(axes_grid.flat, names):
            sweep = cells[cell]["sweep"]
            none = sweep.get("none=0")
            for arm in ARM_ORDER[1:]:
                points = sorted(
                    (float(label.split("=")[1]), s) for label, s in sweep.items() if label.split("=")[0] == arm
                )
                if points:
                    ax.errorbar(
                        [p[0] for p in points],
                        [100 * p[1]["val_accuracy"][0] for p in points],
                        yerr=[100 * p[1]["val_accuracy"][1] for p in points],
                        marker="o",
                        ms=3,
                        label=arm,
                        color=ARM_COLORS[arm],
                        capsize=2,
                    )
            if none:
                ax.axhline(100 * none["val_accuracy"][0], color=ARM_COLORS["none"], ls="--", lw=1, label="none")
            ax.set_xscale("log")
            ax.set_title(cell, fontsize=9)
            ax.tick_params(labelsize=7)
        _label_grid(axes_grid, len(names), "validation acc %")
        fig.suptitle(f"{regime.upper()} strength sweeps (x: strength, log scale)", fontsize=10)
        paths.append(_save(fig, directory / f"{regime}_sweeps.png"))

    cells = a["sgd"]
    eps = [e for e in config.eps]
    if cells:
        names = list(cells)
        fig, axes_grid = _cell_grid(len(names))
        for ax, cell in zip(axes_grid.flat, names):
            for arm, s in cells[cell]["selected"].items():
                ys = [100 * s["test_accuracy"][0] if e == 0 else 100 * s[f"pgd_{e:g}"][0] for e in eps]
                ax.plot(eps, ys, marker="o", ms=3, label=arm, color=ARM_COLORS[arm])
            ax.set_title(cell, fontsize=9)
            ax.tick_params(labelsize=7)
        _label_grid(axes_grid, len(names), "PGD accuracy %")
        fig.suptitle("Regime 1: PGD-20 Linf accuracy vs eps (selected strengths)", fontsize=10)
        paths.append(_save(fig, directory / "sgd_pgd_vs_eps.png"))

    titles = {
        "shift": "Regime 2: same function, shifted inits (SGD)",
        "shift_eq": "Regime 2b: shifted inits, equivariant SGD",
        "finetune": "Regime 4: fine-tuning after a shift",
    }
    for regime, key, ylabel in (
        ("shift", "disagreement_with_unshifted", "predictions ≠ unshifted run %"),
        ("shift_eq", "disagreement_with_unshifted", "predictions ≠ unshifted run %"),
        ("finetune", "disagreement_with_unshifted", "predictions ≠ unshifted fine-tune %"),
    ):
        stats = a.get(regime)
        if not stats:
            continue
        archs = sorted({s["arch"] for s in stats.values()})
        variants = sorted(
            {(s["arm"], s["strength"]) for s in stats.values()}, key=lambda v: (ARM_ORDER.index(v[0]), v[1])
        )
        fig, ax = plt.subplots(figsize=(2.6 + 0.5 * len(archs) * len(variants), 3.4))
        width = 0.8 / len(variants)
        for k, (arm, strength) in enumerate(variants):
            xs, ys, es = [], [], []
            for i, arch in enumerate(archs):
                s = next(
                    (s for s in stats.values() if (s["arch"], s["arm"], s["strength"]) == (arch, arm, strength)), None
                )
                if s:
                    xs.append(i + (k - (len(variants) - 1) / 2) * width)
                    ys.append(100 * s[key][0])
                    es.append(100 * s[key][1])
            if xs:
                label = arm if arm == "none" else f"{arm} {strength:g}"
                alpha = (
                    1.0
                    if sum(v[0] == arm for v in variants) == 1 or strength == min(v[1] for v in variants if v[0] == arm)
                    else 0.55
                )
                ax.bar(xs, ys, width, yerr=es, label=label, color=ARM_COLORS[arm], alpha=alpha, capsize=2)
        ax.set_xticks(range(len(archs)), archs)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
        ax.set_title(titles[regime], fontsize=9)
        paths.append(_save(fig, directory / f"{regime}.png"))
    return paths


def write_outputs(results: dict[str, Any], config: ExperimentConfig) -> None:
    """Raw JSON per regime + summary JSON + plots under `config.output`; tables into `config.markdown`
    (between the generated-results markers; text outside them is kept)."""
    directory = Path(config.output)
    directory.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    for regime in sorted({r["regime"] for r in runs}):
        (directory / f"runs_{regime}.json").write_text(
            "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in runs if r["regime"] == regime) + "\n]\n"
        )
    summary = {k: v for k, v in results.items() if k != "runs"}
    (directory / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    plots = make_plots(results, config, directory)
    md_path = Path(config.markdown)
    relative = [str(p.relative_to(md_path.parent)) if p.is_relative_to(md_path.parent) else str(p) for p in plots]
    generated = markdown(results, config, relative)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    existing = md_path.read_text() if md_path.exists() else ""
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        md_path.write_text(head + generated + tail)
    else:
        md_path.write_text((existing.rstrip() + "\n\n" if existing else "# Results\n\n") + generated + "\n")


def rebuild(raw_path: str | Path, summary_path: str | Path, config: ExperimentConfig | None = None) -> dict[str, Any]:
    """Recompute summaries, plots and Markdown from a raw dump (`dump_raw`) and the run's
    summary.json (demo, machine, timing), without training anything."""
    raw = json.loads(Path(raw_path).read_text())
    summary = json.loads(Path(summary_path).read_text())
    if config is None:
        config = ExperimentConfig(
            **{k: v for k, v in raw["config"].items() if k in ExperimentConfig.__dataclass_fields__}
        )
    selection = {tuple(k): v for k, v in raw["selection"]}
    runs = raw["runs"]
    results: dict[str, Any] = {key: summary[key] for key in ("config", "machine", "demo", "selection", "seconds")}
    results["attack"] = summary.get("attack") or next((r["attack"] for r in runs if "attack" in r), None)
    results["analysis"] = analyse(runs, selection, config, dump=False)
    results["runs"] = [public_record(r) for r in runs]
    write_outputs(results, config)
    return results
