"""The audit report: typed records whose `to_dict()` is exactly the JSON contract (schema 1)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


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


@dataclass
class ChainRecord:
    id: int
    weights: list[str]
    layers: list[str]
    log10_intrinsic_norm: float | None
    imbalance_decades: float | None
    wd_excess: float | None
    log10_wd_excess: float | None
    verified: bool | None


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
    log10_input_gradient_bound: float | None
    all_verified: bool | None
    log10_path2_norm: float | None = None
    log10_intrinsic_norm: float | None = None
    input_gradient_bound_note: str = ""
    verification_note: str = ""
    max_verification_error: float | None = None


@dataclass
class Report:
    model: ModelRecord
    trace: TraceRecord
    layers: list[LayerRecord]
    chains: list[ChainRecord]
    residual_blocks: list[ResidualBlockRecord]
    barriers: list[BarrierRecord]
    summary: SummaryRecord
    tool_version: str = ""

    @property
    def failed_chains(self) -> list[ChainRecord]:
        """Chains whose scale-shift check failed: an analyzer bug, never a model property."""
        return [chain for chain in self.chains if chain.verified is False]

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
        }
        return _finite(document)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    """JSON has no infinities: a non-finite float (a collapsed, all-zero layer) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
