"""CI model checks: rules over an audit report, each giving a pass/fail/skip `CheckResult`.

Rules come from ``[tool.wssi-audit]`` in pyproject.toml (or a given TOML file) and can be
overridden by command-line flags. Every rule reads the JSON report document (`Report.to_dict()`),
so a baseline is simply an earlier JSON report (with or without its ``checks`` list).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InputError, describe
from .report import Report

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PASS, FAIL, SKIP = "pass", "fail", "skip"
DEFAULT_TOLERANCE = 0.05


@dataclass
class Rules:
    """Thresholds; None (or False) means the rule is off."""

    max_imbalance: float | None = None  # decades, summary.max_imbalance_decades
    max_log10_intrinsic_norm: float | None = None  # largest chain log10 intrinsic norm
    max_log10_gradient_bound: float | None = None  # summary.log10_input_gradient_bound
    min_coverage: float | None = None  # trace.coverage, in [0, 1]
    require_verified: bool = False  # every chain of 2+ layers verified (not failed, not unverifiable)
    fail_on: str = "error"  # fail on findings of this severity or worse: error, warning, info or none
    baseline: str | None = None  # path of a baseline JSON report
    tolerance: float = DEFAULT_TOLERANCE  # allowed regression vs the baseline, in the metric's units


@dataclass
class CheckResult:
    name: str
    status: str  # "pass" | "fail" | "skip"
    value: float | bool | None
    threshold: float | bool | None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Config key (TOML spelling) -> Rules field.
CONFIG_KEYS = {f.name.replace("_", "-"): f.name for f in fields(Rules)}


def _metric_imbalance(doc: Mapping[str, Any]) -> float | None:
    return doc["summary"].get("max_imbalance_decades")


def _metric_intrinsic(doc: Mapping[str, Any]) -> float | None:
    values = [c["log10_intrinsic_norm"] for c in doc.get("chains", []) if c.get("log10_intrinsic_norm") is not None]
    return max(values) if values else None


def _metric_gradient(doc: Mapping[str, Any]) -> float | None:
    """The certified input-gradient bound (schema 2); a schema-1 baseline's only bound otherwise."""
    gradient = doc["summary"].get("gradient")
    if gradient is None:
        return doc["summary"].get("log10_input_gradient_bound")
    return gradient.get("log10_certified_bound")


def _metric_coverage(doc: Mapping[str, Any]) -> float | None:
    return doc["trace"].get("coverage")


# name, metric, rule field, higher_is_worse
METRICS: list[tuple[str, Callable[[Mapping[str, Any]], float | None], str, bool]] = [
    ("max-imbalance", _metric_imbalance, "max_imbalance", True),
    ("max-log10-intrinsic-norm", _metric_intrinsic, "max_log10_intrinsic_norm", True),
    ("max-log10-gradient-bound", _metric_gradient, "max_log10_gradient_bound", True),
    ("min-coverage", _metric_coverage, "min_coverage", False),
]


def _document(report: Report | Mapping[str, Any]) -> Mapping[str, Any]:
    return report.to_dict() if isinstance(report, Report) else report


def _threshold_check(name: str, value: float | None, threshold: float, higher_is_worse: bool) -> CheckResult:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return CheckResult(name, FAIL, None, threshold, "metric not available for this model (see the audit report)")
    ok = value <= threshold if higher_is_worse else value >= threshold
    sign = "<=" if higher_is_worse else ">="
    message = f"{value:.4g} {sign} {threshold:g}" if ok else f"{value:.4g} is not {sign} {threshold:g}"
    return CheckResult(name, PASS if ok else FAIL, value, threshold, message)


INCONSISTENCY_CODES = ("self_check_failed", "global_check_failed")
SEVERITY_ORDER = ("error", "warning", "info")
FAIL_ON = (*SEVERITY_ORDER, "none")


def self_check(report: Report | Mapping[str, Any]) -> CheckResult:
    """Always run: an analysis inconsistency (a chain that fails its shift check) is exit 3."""
    doc = _document(report)
    codes = [f for f in doc.get("findings", []) if f.get("code") in INCONSISTENCY_CODES]
    failed = [c["id"] for c in doc.get("chains", []) if c.get("verification") == "failed"]
    if codes:
        return CheckResult("self-check", FAIL, len(failed), 0, codes[0]["message"])
    return CheckResult("self-check", PASS, 0, 0, "no analysis inconsistency")


def findings_check(doc: Mapping[str, Any], fail_on: str) -> list[CheckResult]:
    """One result per finding at or above `fail_on` (fail), or one pass when there is none."""
    if fail_on == "none":
        return []
    limit = SEVERITY_ORDER.index(fail_on)
    hits = [
        f
        for f in doc.get("findings", [])
        if f.get("severity") in SEVERITY_ORDER and SEVERITY_ORDER.index(f["severity"]) <= limit
    ]
    if not hits:
        return [CheckResult("findings", PASS, 0, fail_on, f"no finding of severity {fail_on} or worse")]
    return [
        CheckResult(f"finding:{f['code']}", FAIL, f["severity"], fail_on, f"{f['message']}; {f['action']}")
        for f in hits
    ]


def run_checks(
    report: Report | Mapping[str, Any], rules: Rules, baseline: Mapping[str, Any] | None = None
) -> list[CheckResult]:
    """Evaluate every enabled rule on one model's report (a `Report` or its JSON document).

    `baseline` is the baseline report document; when omitted and `rules.baseline` is a path,
    it is read from there.
    """
    doc = _document(report)
    results = [self_check(doc)]
    for name, metric, field_name, higher_is_worse in METRICS:
        threshold = getattr(rules, field_name)
        if threshold is not None:
            results.append(_threshold_check(name, metric(doc), float(threshold), higher_is_worse))
    if rules.require_verified:
        results.append(_require_verified(doc))
    results.extend(findings_check(doc, rules.fail_on))
    if baseline is None and rules.baseline:
        baseline = load_baseline(rules.baseline, doc)
    if baseline is not None:
        results.extend(_baseline_checks(doc, baseline, rules.tolerance))
    return results


def _require_verified(doc: Mapping[str, Any]) -> CheckResult:
    verified = doc["summary"].get("all_verified")
    if verified is True:
        return CheckResult("require-verified", PASS, True, True, "every chain of 2+ layers verified")
    if verified is None:
        why = doc["summary"].get("verification_note") or "not verified: give --input-shape"
        return CheckResult("require-verified", FAIL, None, True, why)
    states = [c for c in doc.get("chains", []) if c.get("verification") in ("failed", "unverifiable")]
    described = ", ".join(f"chain {c['id']} {c['verification']}" for c in states[:4]) or "the global check failed"
    return CheckResult("require-verified", FAIL, False, True, described)


def _baseline_checks(doc: Mapping[str, Any], baseline: Mapping[str, Any], tolerance: float) -> list[CheckResult]:
    results = []
    for name, metric, _, higher_is_worse in METRICS:
        rule = f"baseline:{name.split('-', 1)[1]}"
        old, new = metric(baseline), metric(doc)
        if old is None:
            results.append(CheckResult(rule, SKIP, new, None, "metric not in the baseline report"))
            continue
        limit = old + tolerance if higher_is_worse else old - tolerance
        check = _threshold_check(rule, new, limit, higher_is_worse)
        direction = "rose" if higher_is_worse else "fell"
        if check.status == FAIL and new is not None:
            check.message = f"{direction} from {old:.4g} to {new:.4g} (tolerance {tolerance:g})"
        elif check.status == PASS:
            check.message = f"{new:.4g} vs baseline {old:.4g} (tolerance {tolerance:g})"
        results.append(check)
    return results


def load_baseline(path: str | Path, doc: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """A baseline JSON report; from a list of reports (several models), the one with the same
    model source, else the one with the same file name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"baseline report not found: {path}") from None
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read baseline report {path}: {describe(error)}") from None
    candidates = data if isinstance(data, list) else [data]
    candidates = [c for c in candidates if isinstance(c, dict) and "summary" in c and "trace" in c]
    if not candidates:
        raise InputError(f"{path} is not a wssi-audit JSON report (no 'summary' and 'trace')")
    if len(candidates) == 1 or doc is None:
        return candidates[0]
    source = doc.get("model", {}).get("source", "")
    for match in (
        lambda c: c["model"]["source"] == source,
        lambda c: Path(c["model"]["source"]).name == Path(source).name,
    ):
        found = [c for c in candidates if "model" in c and match(c)]
        if found:
            return found[0]
    raise InputError(f"baseline report {path} has no entry for model {source}")


def read_config(path: str | Path | None = None) -> dict[str, Any]:
    """The ``[tool.wssi-audit]`` table of `path` (default ./pyproject.toml, optional). A given file
    without that table is read as a whole (a dedicated wssi-audit.toml). A relative `baseline`
    is relative to the config file, so CI can run from any directory."""
    explicit = path is not None
    path = Path(path) if path is not None else Path("pyproject.toml")
    if not path.exists():
        if explicit:
            raise InputError(f"config file not found: {path}")
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise InputError(f"cannot read config {path}: {describe(error)}") from None
    table = data.get("tool", {}).get("wssi-audit")
    if table is None:
        table = {k: v for k, v in data.items() if k != "tool"} if explicit and path.name != "pyproject.toml" else {}
    if not isinstance(table, dict):
        raise InputError(f"[tool.wssi-audit] in {path} must be a table")
    if isinstance(table.get("baseline"), str) and not Path(table["baseline"]).is_absolute():
        table = {**table, "baseline": str(path.parent / table["baseline"])}  # relative to the config file
    return table


def rules_from_config(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Rules:
    """Rules from a config table (TOML spelling: max-imbalance, ...), then non-None overrides."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        field_name = CONFIG_KEYS.get(key) or (key if key in CONFIG_KEYS.values() else None)
        if field_name is None:
            raise InputError(f"unknown key '{key}' in [tool.wssi-audit] (known: {', '.join(sorted(CONFIG_KEYS))})")
        values[field_name] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    rules = Rules()
    for field_name, value in values.items():
        default = getattr(rules, field_name)
        try:
            if field_name == "require_verified":
                if not isinstance(value, bool):
                    raise TypeError
            elif field_name == "fail_on":
                if value not in FAIL_ON:
                    raise InputError(f"'fail-on' must be one of {', '.join(FAIL_ON)}, not {value!r}")
            elif field_name == "baseline":
                value = str(value)
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError
            else:
                value = float(value)
        except TypeError:
            kind = "true or false" if isinstance(default, bool) else "a number"
            raise InputError(f"'{field_name.replace('_', '-')}' must be {kind}, not {value!r}") from None
        setattr(rules, field_name, value)
    if rules.min_coverage is not None and not 0.0 <= rules.min_coverage <= 1.0:
        raise InputError(f"'min-coverage' must be between 0 and 1, not {rules.min_coverage}")
    if rules.tolerance < 0:
        raise InputError(f"'tolerance' must be >= 0, not {rules.tolerance}")
    return rules
