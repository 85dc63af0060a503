"""The audit report: typed records whose `to_dict()` is exactly the JSON contract (schema 2,
shipped as wssi_audit/report.schema.json and printed by `wssi-audit schema`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2


@dataclass
class LayerRecord:
    name: str
    weight: str
    kind: str
    shape: list[int]
    frobenius: float
    spectral: float | None
    bias_norm: float | None
    folded_bn: str | None
    parameters: int
    log10_frobenius: float | None
    chain: int
    homogeneous: bool
    status: str = "ok"  # ok | zero (all-zero weight) | non_finite (NaN or Inf in the layer's tensors)
    log10_operator_norm: float | None = None  # certified upper bound at the traced input size
    dead: bool = False  # its activated output is identically zero on the example input


@dataclass
class ChainRecord:
    id: int
    weights: list[str]
    layers: list[str]
    log10_intrinsic_norm: float | None
    imbalance_decades: float | None
    wd_excess: float | None
    log10_wd_excess: float | None
    verification: str  # verified | failed | unverifiable | trivial | not_run
    verification_error: float | None = None  # largest relative change under the compensated shifts
    verification_power: float | None = None  # relative change under the uncompensated control
    verification_reason: str = ""
    # chain layer -> the layers it carries (parallel paths that split from it and rejoin before
    # the next one: Res2Net's branch convs, a one-conv residual branch). A shift of the chain keeps
    # their weights and scales their biases (folded BatchNorm's mean and beta) by that layer's c.
    carried: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ResidualBlockRecord:
    id: int
    shortcut: str
    shortcut_weight: str | None
    branch_weights: list[str]
    log10_branch_norm: float | None
    add_node: str
    chain: int


@dataclass
class BarrierRecord:
    node: str
    op: str
    reason: str


@dataclass
class UnanalyzedRecord:
    node: str
    reason: str


@dataclass
class TraceRecord:
    method: str
    nodes: int
    coverage: float
    unanalyzed: list[UnanalyzedRecord]
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class FindingRecord:
    code: str  # stable identifier, e.g. "imbalance", "non_finite_weights"
    severity: str  # error | warning | info
    message: str
    action: str  # what to do about it
    subjects: list[str] = field(default_factory=list)  # layers or chains concerned


@dataclass
class GradientRecord:
    """Three input-gradient figures (log10 of l2 -> l2 norms), from loose to measured."""

    log10_frobenius_bound: float | None  # the paper's product of Frobenius norms (what the regularizer controls)
    log10_certified_bound: float | None  # proven upper bound from per-layer operator norms at the traced size
    log10_measured: float | None  # ||dy/dx||_2 at the example inputs: a lower estimate of the truth
    frobenius_note: str = ""
    certified_note: str = ""
    measured_note: str = ""
    certified_method: str = ""
    measured_method: str = ""


@dataclass
class ModelRecord:
    source: str
    format: str
    parameters: int


@dataclass
class SummaryRecord:
    chains: int
    residual_blocks: int
    homogeneous_weight_fraction: float
    max_imbalance_decades: float | None
    gradient: GradientRecord
    all_verified: bool | None  # every chain of 2+ layers verified (None: not run)
    verification: dict[str, int] = field(default_factory=dict)  # status -> number of chains
    log10_path2_norm: float | None = None
    log10_intrinsic_norm: float | None = None
    verification_note: str = ""
    verification_dtype: str = ""
    max_verification_error: float | None = None
    global_verification_error: float | None = None  # every chain shifted at once, at the outputs


@dataclass
class Report:
    model: ModelRecord
    trace: TraceRecord
    layers: list[LayerRecord]
    chains: list[ChainRecord]
    residual_blocks: list[ResidualBlockRecord]
    barriers: list[BarrierRecord]
    summary: SummaryRecord
    findings: list[FindingRecord] = field(default_factory=list)
    tool_version: str = ""

    @property
    def failed_chains(self) -> list[ChainRecord]:
        """Chains whose scale-shift check failed (an analyzer bug, or non-finite weights)."""
        return [chain for chain in self.chains if chain.verification == "failed"]

    @property
    def inconsistent(self) -> bool:
        """An analysis inconsistency (exit 3): a chain failed its self-check for a reason other than
        its own non-finite weights, or the global check failed."""
        return any(f.code in ("self_check_failed", "global_check_failed") for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        document = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "wssi-audit", "version": self.tool_version},
            "model": asdict(self.model),
            "trace": asdict(self.trace),
            "layers": [asdict(x) for x in self.layers],
            "chains": [asdict(x) for x in self.chains],
            "residual_blocks": [asdict(x) for x in self.residual_blocks],
            "barriers": [asdict(x) for x in self.barriers],
            "summary": asdict(self.summary),
            "findings": [asdict(x) for x in self.findings],
        }
        return _finite(document)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def schema_text() -> str:
    """The JSON Schema of `Report.to_dict()`, as shipped in the package."""
    from importlib.resources import files

    return files(__package__).joinpath("report.schema.json").read_text()


def _finite(value: Any) -> Any:
    """JSON has no infinities: a non-finite float (a collapsed, all-zero layer) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
