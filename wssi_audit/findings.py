"""What the audit tells the user to do: findings with a severity and an action, from the report.

One rule per row of `RULES`: a function of the report returning findings. Severities: ``error`` (the
numbers cannot be trusted or the model is broken: `check` fails on these by default), ``warning``
(worth acting on), ``info`` (context).
"""

from __future__ import annotations

from collections.abc import Callable

from .report import FindingRecord, Report

SEVERITIES = ("error", "warning", "info")
# What is normal: networks trained with SGD from a standard init sit within ~0.3 decades of balance.
IMBALANCE_WARNING = 1.0  # decades
IMBALANCE_INFO = 0.5
LOW_COVERAGE = 0.95
FRAGMENTED_FRACTION = 0.5  # homogeneous share of weight-layer parameters below which we warn


def _names(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def non_finite_weights(report: Report) -> list[FindingRecord]:
    broken = [layer.name for layer in report.layers if layer.status == "non_finite"]
    if not broken:
        return []
    return [
        FindingRecord(
            "non_finite_weights",
            "error",
            f"{len(broken)} layer(s) hold NaN or Inf weights or BatchNorm statistics, or fold to them "
            f"(a BatchNorm eps that is NaN or leaves var + eps <= 0): {_names(broken)}",
            "the model is broken (training diverged or the file is damaged): restore an earlier checkpoint",
            broken,
        )
    ]


def self_check_failed(report: Report) -> list[FindingRecord]:
    failed = [
        c for c in report.chains if c.verification == "failed" and not c.verification_reason.startswith("non-finite")
    ]
    if not failed:
        return []
    ids = [str(c.id) for c in failed]
    return [
        FindingRecord(
            "self_check_failed",
            "error",
            f"chain(s) {_names(ids)} changed their output under a function-preserving weight scale shift: "
            "the analyzer claimed something false about this model",
            "do not trust these chains' numbers; please report it with the model (exit code 3)",
            [f"chain {i}" for i in ids],
        )
    ]


def global_check_failed(report: Report) -> list[FindingRecord]:
    s = report.summary
    if s.global_verification_error is None or s.all_verified is not False or report.failed_chains:
        return []
    if not any(c.verification == "verified" for c in report.chains) or s.verification.get("unverifiable"):
        return []
    return [
        FindingRecord(
            "global_check_failed",
            "error",
            f"every chain passed its own check, but shifting all of them at once moved the outputs by "
            f"{s.global_verification_error:.1e}",
            "an analyzer inconsistency: please report it with the model (exit code 3)",
        )
    ]


def unverifiable_chains(report: Report) -> list[FindingRecord]:
    chains = [c for c in report.chains if c.verification == "unverifiable"]
    if not chains:
        return []
    return [
        FindingRecord(
            "unverifiable_chain",
            "warning",
            f"{len(chains)} chain(s) could not be checked with power ({chains[0].verification_reason}): "
            f"{_names([str(c.id) for c in chains])}",
            "their numbers are unchecked: audit with inputs that activate them (--input-shape, real data)",
            [f"chain {c.id}" for c in chains],
        )
    ]


# Why chains were not checked (the start of the verification note) -> what to do about it.
NOT_VERIFIED_ACTIONS = {
    "verification skipped": "audit without --no-verify (verify=True) to check every chain",
    "verification could not run": "the model failed to run in the check (the note says why): give an input it runs "
    "on (--input-shape), or report the op that failed",
}
NO_INPUT_ACTION = "give an example input shape (--input-shape 1,3,224,224) so every chain is checked"


def not_verified(report: Report) -> list[FindingRecord]:
    if report.summary.verification.get("not_run", 0) == 0:
        return []
    note = report.summary.verification_note or "no example input"
    action = next((act for why, act in NOT_VERIFIED_ACTIONS.items() if note.startswith(why)), NO_INPUT_ACTION)
    return [FindingRecord("not_verified", "warning", f"chains were not checked: {note}", action)]


def zero_layers(report: Report) -> list[FindingRecord]:
    zero = [layer.name for layer in report.layers if layer.status == "zero"]
    if not zero:
        return []
    return [
        FindingRecord(
            "zero_layer",
            "warning",
            f"{len(zero)} layer(s) are all zeros (collapsed): {_names(zero)}",
            "the output no longer depends on what feeds them: lower weight decay or the regularizer's strength",
            zero,
        )
    ]


def dead_layers(report: Report) -> list[FindingRecord]:
    dead = [layer.name for layer in report.layers if layer.dead]
    if not dead:
        return []
    return [
        FindingRecord(
            "dead_layer",
            "warning",
            f"{len(dead)} layer(s) output only zeros after their activation on the example input: {_names(dead)}",
            "check with real data; if they stay dead, they can be pruned or re-initialized",
            dead,
        )
    ]


def imbalance(report: Report) -> list[FindingRecord]:
    worst = [c for c in report.chains if c.imbalance_decades is not None and len(c.layers) > 1]
    worst = [c for c in worst if c.imbalance_decades >= IMBALANCE_INFO]
    if not worst:
        return []
    top = max(worst, key=lambda c: c.imbalance_decades or 0.0)
    severity = "warning" if (top.imbalance_decades or 0.0) >= IMBALANCE_WARNING else "info"
    excess = f", weight decay pays {top.wd_excess:.3g}x its balanced minimum" if top.wd_excess else ""
    return [
        FindingRecord(
            "imbalance",
            severity,
            f"chain {top.id} spans {top.imbalance_decades:.2f} decades of layer norms{excess} "
            f"({len(worst)} chain(s) over {IMBALANCE_INFO} decades; SGD from a standard init stays near 0.3)",
            f"rebalance without changing the function: wssi-audit balance {report.model.source} -o balanced"
            f"{_suffix(report.model.source)}",
            [f"chain {c.id}" for c in worst],
        )
    ]


def _suffix(source: str) -> str:
    dot = source.rfind(".")
    return source[dot:] if dot > source.rfind("/") and dot >= 0 else ".pt2"


def fragmented(report: Report) -> list[FindingRecord]:
    s = report.summary
    if not report.barriers or not report.layers:
        return []
    long_chains = sum(1 for c in report.chains if len(c.layers) > 1)
    severity = "warning" if s.homogeneous_weight_fraction < FRAGMENTED_FRACTION else "info"
    kinds = sorted({b.op for b in report.barriers})
    return [
        FindingRecord(
            "fragmented",
            severity,
            f"{len(report.barriers)} barrier(s) ({_names(kinds)}) cut the network into {len(report.chains)} "
            f"chain(s), {long_chains} of 2+ layers; {s.homogeneous_weight_fraction:.0%} of weight-layer "
            "parameters are in homogeneous chains or residual blocks",
            "the invariant regularizer covers only those; weights elsewhere keep plain weight decay",
        )
    ]


def low_coverage(report: Report) -> list[FindingRecord]:
    if report.trace.coverage >= LOW_COVERAGE:
        return []
    ops = _names(sorted({u.reason for u in report.trace.unanalyzed}), 3)
    return [
        FindingRecord(
            "low_coverage",
            "warning",
            f"only {report.trace.coverage:.0%} of the ops were analysed ({ops})",
            "ops not in the op table count as unknown: add rows to wssi_audit.ops.OP_TABLE, or report them",
            [u.node for u in report.trace.unanalyzed],
        )
    ]


def loose_bound(report: Report) -> list[FindingRecord]:
    g = report.summary.gradient
    if g.log10_certified_bound is None or g.log10_measured is None:
        return []
    gap = g.log10_certified_bound - g.log10_measured
    if gap < 3:
        return []
    return [
        FindingRecord(
            "loose_bound",
            "info",
            f"the certified gradient bound is {gap:.1f} decades above the gradient measured at the example "
            "input: a worst case the data does not reach",
            "judge robustness by the measured figure (and an attack), not by the bound alone",
        )
    ]


RULES: list[Callable[[Report], list[FindingRecord]]] = [
    non_finite_weights,
    self_check_failed,
    global_check_failed,
    unverifiable_chains,
    not_verified,
    zero_layers,
    dead_layers,
    imbalance,
    fragmented,
    low_coverage,
    loose_bound,
]


def find(report: Report) -> list[FindingRecord]:
    """Every rule's findings, most severe first."""
    found = [finding for rule in RULES for finding in rule(report)]
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))
