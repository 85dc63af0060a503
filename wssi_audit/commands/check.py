"""`wssi-audit check MODEL [MODEL...]`: CI gate over audit metrics (rules in wssi_audit.checks)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from ..checks import (
    FAIL,
    PASS,
    SKIP,
    CheckResult,
    Rules,
    load_baseline,
    read_config,
    rules_from_config,
    run_checks,
)
from ..cli_support import check_output_file, console, error_console, handle_errors, write_atomic
from ..errors import EXIT_INCONSISTENT, EXIT_OK, EXIT_RULE_FAILED, EXIT_USAGE, WssiError
from .audit import (
    ARCH,
    DATA,
    DATA_EXAMPLES,
    IMPORTS,
    INPUT_SHAPE,
    MEASURE,
    METHOD,
    SEED,
    TRUST_PICKLE,
    check_trace_method,
    load_for_cli,
    measure_points,
)

if TYPE_CHECKING:  # imported when a check runs, not when --help is shown
    import torch

    from ..loading import LoadedModel

EXIT_CODES_HELP = (
    "Exit codes: 0 every rule passed; 1 a rule failed; 2 usage or input error (bad option, config, "
    "or a model file that cannot be read); 3 analysis inconsistency (a chain failed its scale-shift "
    "self-check). With several models the most serious wins: 2, then 3, then 1."
)


class CheckFormat(str, Enum):
    table = "table"
    json = "json"
    junit = "junit"
    github = "github"
    sarif = "sarif"


@dataclass
class ModelOutcome:
    """One model's checks, or the one-line error that stopped it."""

    source: str
    results: list[CheckResult] = field(default_factory=list)
    document: dict[str, Any] | None = None  # the audit report document
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_USAGE
        if any(r.name == "self-check" and r.status == FAIL for r in self.results):
            return EXIT_INCONSISTENT
        if any(r.status == FAIL for r in self.results):
            return EXIT_RULE_FAILED
        return EXIT_OK


def overall_exit_code(outcomes: list[ModelOutcome]) -> int:
    codes = {o.exit_code for o in outcomes}
    for code in (EXIT_USAGE, EXIT_INCONSISTENT, EXIT_RULE_FAILED):
        if code in codes:
            return code
    return EXIT_OK


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_table(outcomes: list[ModelOutcome], out: Console) -> None:
    table = Table(title="wssi-audit check", show_lines=False)
    for column in ("model", "rule", "status", "value", "threshold", "detail"):
        table.add_column(column, overflow="fold")
    styles = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
    for outcome in outcomes:
        name = Path(outcome.source).name
        if outcome.error is not None:
            table.add_row(name, "load", "[bold red]error[/]", "-", "-", outcome.error)
            continue
        for r in outcome.results:
            status = f"[{styles[r.status]}]{r.status}[/]"
            table.add_row(name, r.name, status, _value(r.value), _value(r.threshold), r.message)
    out.print(table)
    results = [r for o in outcomes for r in o.results]
    failed = sum(r.status == FAIL for r in results)
    errors = sum(o.error is not None for o in outcomes)
    out.print(
        f"{len(outcomes)} model(s), {len(results)} check(s): {sum(r.status == PASS for r in results)} passed, "
        f"{failed} failed, {sum(r.status == SKIP for r in results)} skipped, {errors} error(s)",
        highlight=False,
    )


def _outcome_document(outcome: ModelOutcome) -> dict[str, Any]:
    checks = [r.to_dict() for r in outcome.results]
    if outcome.error is not None:
        return {"model": {"source": outcome.source}, "error": outcome.error, "checks": checks, "exit_code": EXIT_USAGE}
    return {**(outcome.document or {}), "checks": checks, "exit_code": outcome.exit_code}


def render_json(outcomes: list[ModelOutcome]) -> str:
    """One model: its audit report plus `checks`; several: a JSON list of those."""
    documents = [_outcome_document(o) for o in outcomes]
    data: Any = documents[0] if len(documents) == 1 else documents
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def render_junit(outcomes: list[ModelOutcome]) -> str:
    """JUnit XML: one testsuite per model, one testcase per rule."""
    root = ET.Element("testsuites", name="wssi-audit")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for outcome in outcomes:
        suite = ET.SubElement(root, "testsuite", name=outcome.source)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if outcome.error is not None:
            case = ET.SubElement(suite, "testcase", classname=outcome.source, name="load")
            ET.SubElement(case, "error", message=outcome.error, type="InputError").text = outcome.error
            counts["tests"] += 1
            counts["errors"] += 1
        for r in outcome.results:
            case = ET.SubElement(suite, "testcase", classname=outcome.source, name=r.name)
            counts["tests"] += 1
            if r.status == FAIL:
                kind = "AnalysisInconsistency" if r.name == "self-check" else "RuleFailed"
                detail = f"value {_value(r.value)}, threshold {_value(r.threshold)}: {r.message}"
                ET.SubElement(case, "failure", message=r.message, type=kind).text = detail
                counts["failures"] += 1
            elif r.status == SKIP:
                ET.SubElement(case, "skipped", message=r.message)
                counts["skipped"] += 1
            else:
                ET.SubElement(case, "system-out").text = r.message
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(outcomes: list[ModelOutcome]) -> str:
    """GitHub Actions workflow commands: one ::error per failure, one ::notice summary."""
    lines = []
    for outcome in outcomes:
        location = _escape_property(outcome.source)
        if outcome.error is not None:
            lines.append(f"::error file={location},title=wssi-audit::{_escape_data(outcome.error)}")
        for r in outcome.results:
            if r.status == FAIL:
                title = _escape_property(f"wssi-audit {r.name}")
                message = _escape_data(f"{r.name} failed: {r.message}")
                lines.append(f"::error file={location},title={title}::{message}")
    passed = sum(r.status == PASS for o in outcomes for r in o.results)
    total = sum(len(o.results) for o in outcomes)
    lines.append(f"::notice title=wssi-audit::{passed} of {total} checks passed on {len(outcomes)} model(s)")
    return "\n".join(lines) + "\n"


SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}
RULE_HELP = {
    "self-check": "A chain changed its output under a function-preserving weight scale shift: an analyzer bug.",
    "load": "The model file could not be read or traced.",
    "require-verified": "Every chain of 2+ layers must pass its scale-shift self-check with a control.",
    "max-imbalance": "Largest spread of log10 layer norms inside a chain (decades); fix: wssi-audit balance.",
    "max-log10-intrinsic-norm": "Largest log10 product of a chain's layer norms.",
    "max-log10-gradient-bound": "log10 of the certified input-gradient (Lipschitz) bound.",
    "min-coverage": "Share of the graph's ops that the op table knows.",
}


def _sarif_rule(rule_id: str) -> dict[str, Any]:
    text = RULE_HELP.get(rule_id) or RULE_HELP.get(rule_id.split(":")[0], "")
    if rule_id.startswith("finding:"):
        text = f"wssi-audit finding '{rule_id.split(':', 1)[1]}' (see the audit report's findings)."
    elif rule_id.startswith("baseline:"):
        text = f"Regression of '{rule_id.split(':', 1)[1]}' against the baseline report."
    return {
        "id": rule_id,
        "name": "".join(part.capitalize() for part in rule_id.replace(":", "-").split("-")),
        "shortDescription": {"text": text or rule_id},
        "helpUri": "https://github.com/wssi-audit/wssi-audit/blob/main/docs/ci.md",
    }


def render_sarif(outcomes: list[ModelOutcome]) -> str:
    """SARIF 2.1.0: one result per failed rule or per finding, located at the model file."""
    from .._version import __version__

    rules: dict[str, int] = {}
    results: list[dict[str, Any]] = []

    def add(rule_id: str, level: str, text: str, source: str) -> None:
        index = rules.setdefault(rule_id, len(rules))
        uri = Path(source).as_posix()
        fingerprint = hashlib.sha256(f"{rule_id}|{uri}|{text}".encode()).hexdigest()[:32]
        results.append(
            {
                "ruleId": rule_id,
                "ruleIndex": index,
                "level": level,
                "message": {"text": text},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {
                                "uri": uri,
                                **({} if Path(uri).is_absolute() else {"uriBaseId": "%SRCROOT%"}),
                            },
                            "region": {"startLine": 1},
                        }
                    }
                ],
                "partialFingerprints": {"wssiAuditResult/v1": fingerprint},
            }
        )

    for outcome in outcomes:
        if outcome.error is not None:
            add("load", "error", outcome.error, outcome.source)
            continue
        for r in outcome.results:
            if r.status == FAIL and not r.name.startswith("finding:"):
                add(r.name, "error", f"{r.name} failed: {r.message}", outcome.source)
        for finding in (outcome.document or {}).get("findings", []):
            add(
                f"finding:{finding['code']}",
                SARIF_LEVEL.get(finding["severity"], "note"),
                f"{finding['message']}. What to do: {finding['action']}",
                outcome.source,
            )
    log = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "wssi-audit",
                        "version": __version__,
                        "informationUri": "https://github.com/wssi-audit/wssi-audit",
                        "rules": [_sarif_rule(rule_id) for rule_id in rules],
                    }
                },
                "results": results,
                "invocations": [
                    {
                        "executionSuccessful": all(o.error is None for o in outcomes),
                        "exitCode": overall_exit_code(outcomes),
                    }
                ],
            }
        ],
    }
    return json.dumps(log, indent=2) + "\n"


def check_models(
    models: list[Path],
    rules: Rules,
    load: Callable[[Path], LoadedModel],
    method: str = "auto",
    seed: int = 0,
    measure: bool = True,
    measure_on: torch.Tensor | None = None,
) -> list[ModelOutcome]:
    """Audit and check each model; an unreadable model becomes an error outcome, not an abort."""
    from ..auditing import analyze

    outcomes = []
    for path in models:
        outcome = ModelOutcome(str(path))
        try:
            loaded = load(path)
            report = analyze(
                loaded, method=method, verify=True, measure=measure, seed=seed, measure_on=measure_on
            ).report
            outcome.document = report.to_dict()
            outcome.results = run_checks(outcome.document, rules)  # reads rules.baseline itself
        except WssiError as error:
            outcome.error = str(error)
        outcomes.append(outcome)
    return outcomes


def register(app: typer.Typer) -> None:
    @app.command("check", help=f"Check models against rules, for CI. {EXIT_CODES_HELP}")
    @handle_errors
    def check_command(
        models: list[Path] = typer.Argument(..., help="Model files (same formats as audit)."),
        config: Path | None = typer.Option(
            None, "--config", help="TOML file with the rules (default: [tool.wssi-audit] in ./pyproject.toml)."
        ),
        max_imbalance: float | None = typer.Option(
            None, "--max-imbalance", help="Fail when a chain's imbalance exceeds this many decades."
        ),
        max_log10_intrinsic_norm: float | None = typer.Option(
            None, "--max-log10-intrinsic-norm", help="Fail when a chain's log10 intrinsic norm exceeds this."
        ),
        max_log10_gradient_bound: float | None = typer.Option(
            None,
            "--max-log10-gradient-bound",
            help="Fail when log10 of the certified input-gradient bound exceeds this.",
        ),
        min_coverage: float | None = typer.Option(
            None, "--min-coverage", help="Fail when less than this fraction of ops (0..1) is analysed."
        ),
        require_verified: bool | None = typer.Option(
            None,
            "--require-verified/--no-require-verified",
            help="Fail unless every chain of 2+ layers is verified (not failed, not unverifiable).",
        ),
        fail_on: str | None = typer.Option(
            None, "--fail-on", help="Fail on findings of this severity or worse: error (default), warning, info, none."
        ),
        baseline: Path | None = typer.Option(
            None, "--baseline", help="Earlier JSON report: fail when a metric regressed by more than --tolerance."
        ),
        tolerance: float | None = typer.Option(
            None, "--tolerance", help="Allowed regression vs --baseline, in the metric's units (default 0.05)."
        ),
        output_format: CheckFormat = typer.Option(
            CheckFormat.table, "--format", "-f", help="table, json, junit, github or sarif (code scanning)."
        ),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the result here instead of stdout."),
        arch: str | None = ARCH,
        input_shape: str | None = INPUT_SHAPE,
        trust_pickle: bool = TRUST_PICKLE,
        imports: list[str] = IMPORTS,
        method: str = METHOD,
        measure: bool = MEASURE,
        data: str | None = DATA,
        data_examples: int = DATA_EXAMPLES,
        seed: int = SEED,
    ) -> None:
        check_trace_method(method)
        if output is not None:
            check_output_file(output, "--output")
        overrides = {
            "max_imbalance": max_imbalance,
            "max_log10_intrinsic_norm": max_log10_intrinsic_norm,
            "max_log10_gradient_bound": max_log10_gradient_bound,
            "min_coverage": min_coverage,
            "require_verified": require_verified,
            "fail_on": fail_on,
            "baseline": str(baseline) if baseline is not None else None,
            "tolerance": tolerance,
        }
        rules = rules_from_config(read_config(config), overrides)
        if rules.baseline:
            load_baseline(rules.baseline)  # a missing or broken baseline is a usage error, before any work

        def load(path: Path) -> LoadedModel:
            return load_for_cli(path, arch, input_shape, trust_pickle, imports, seed, for_analysis=True)

        points = measure_points(data, data_examples) if measure else None
        outcomes = check_models(models, rules, load, method, seed, measure, points)
        text = _render(outcomes, output_format)
        if output is not None:
            write_atomic(output, text)
            console.print(f"check results written to {output}")
        else:
            typer.echo(text, nl=False)
        if os.environ.get("GITHUB_ACTIONS") == "true" and output_format is not CheckFormat.github:
            # Annotations on stderr: stdout may carry JSON or XML (the runner reads both streams).
            error_console.file.write(render_github(outcomes))
        raise typer.Exit(overall_exit_code(outcomes))


def _render(outcomes: list[ModelOutcome], output_format: CheckFormat) -> str:
    if output_format is CheckFormat.json:
        return render_json(outcomes)
    if output_format is CheckFormat.junit:
        return render_junit(outcomes)
    if output_format is CheckFormat.github:
        return render_github(outcomes)
    if output_format is CheckFormat.sarif:
        return render_sarif(outcomes)
    buffer = io.StringIO()
    render_table(outcomes, Console(file=buffer, width=max(console.width, 100), force_terminal=console.is_terminal))
    return buffer.getvalue()
