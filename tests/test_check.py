"""`wssi-audit check`: rules, config, baseline, output formats and exit codes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wssi_audit.auditing import audit
from wssi_audit.checks import FAIL, PASS, SKIP, Rules, read_config, rules_from_config, run_checks
from wssi_audit.cli import app
from wssi_audit.errors import InputError
from wssi_audit.models import create_model
from wssi_audit.ops import OP_TABLE, OpSpec, Role

runner = CliRunner()
ARCH = ["--arch", "wssi_audit.models:mlp", "--input-shape", "2,1,8,8"]


def _mlp(shift: float = 0.0) -> torch.nn.Module:
    """The same function for every `shift`: first layer x10^shift, last layer x10^-shift."""
    torch.manual_seed(0)
    model = create_model("mlp")
    with torch.no_grad():
        model[1].weight.mul_(10.0**shift)
        model[1].bias.mul_(10.0**shift)
        for index in (3, 5):
            model[index].bias.mul_(10.0**shift)
        model[7].weight.mul_(10.0**-shift)
    return model


@pytest.fixture(autouse=True)
def _not_on_github(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests parse stdout: no automatic annotations, even when the suite runs in Actions."""
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, shift in (("balanced", 0.0), ("shifted", 3.0)):
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(_mlp(shift).state_dict(), paths[name])
    return paths


def test_run_checks_api() -> None:
    report = audit(_mlp(3.0), (torch.randn(2, 1, 8, 8),))
    results = {r.name: r for r in run_checks(report, Rules(max_imbalance=1.0, min_coverage=0.5, require_verified=True))}
    assert results["self-check"].status == PASS
    assert results["max-imbalance"].status == FAIL
    assert results["max-imbalance"].value == pytest.approx(report.summary.max_imbalance_decades)
    assert results["max-imbalance"].threshold == 1.0
    assert results["min-coverage"].status == PASS
    assert results["require-verified"].status == PASS
    # The intrinsic norm and the gradient bound are shift-invariant: the same rule passes on both.
    limit = report.chains[0].log10_intrinsic_norm + 1e-6
    for shift in (0.0, 3.0):
        checked = run_checks(audit(_mlp(shift)), Rules(max_log10_intrinsic_norm=limit, require_verified=True))
        by_name = {r.name: r for r in checked}
        assert by_name["max-log10-intrinsic-norm"].status == PASS
        assert by_name["require-verified"].status == FAIL  # no example input: nothing verified


def test_config_and_overrides(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[tool.wssi-audit]\nmax-imbalance = 0.5\nrequire-verified = true\n")
    rules = rules_from_config(read_config(pyproject), {"max_imbalance": 2.0, "min_coverage": None})
    assert rules.max_imbalance == 2.0 and rules.require_verified and rules.min_coverage is None
    dedicated = tmp_path / "ci" / "wssi.toml"
    dedicated.parent.mkdir()
    dedicated.write_text('min-coverage = 0.9\nbaseline = "baseline.json"\n')
    rules = rules_from_config(read_config(dedicated))
    assert rules.min_coverage == 0.9
    assert rules.baseline == str(tmp_path / "ci" / "baseline.json")  # relative to the config file
    with pytest.raises(InputError, match="unknown key"):
        rules_from_config({"max-imbalence": 1})
    with pytest.raises(InputError, match="must be a number"):
        rules_from_config({"max-imbalance": "big"})
    with pytest.raises(InputError, match="between 0 and 1"):
        rules_from_config({"min-coverage": 90})
    with pytest.raises(InputError, match="not found"):
        read_config(tmp_path / "missing.toml")


def test_cli_exit_codes_and_table(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ok = runner.invoke(app, ["check", str(models["balanced"]), *ARCH, "--max-imbalance", "1"])
    assert ok.exit_code == 0, ok.output
    assert "max-imbalance" in ok.output and "pass" in ok.output
    # Several models, one summary table; config from ./pyproject.toml.
    (tmp_path / "pyproject.toml").write_text("[tool.wssi-audit]\nmax-imbalance = 1.0\nrequire-verified = true\n")
    both = runner.invoke(app, ["check", str(models["balanced"]), str(models["shifted"]), *ARCH])
    assert both.exit_code == 1, both.output
    assert "2 model(s)" in both.output and "1 failed" in both.output
    # A flag overrides the config.
    loose = runner.invoke(app, ["check", str(models["shifted"]), *ARCH, "--max-imbalance", "10"])
    assert loose.exit_code == 0, loose.output
    # Input errors: exit 2, also when another model is fine.
    missing = runner.invoke(app, ["check", str(models["balanced"]), "nope.pt", *ARCH])
    assert missing.exit_code == 2, missing.output
    bad_config = runner.invoke(app, ["check", str(models["balanced"]), *ARCH, "--config", "absent.toml"])
    assert bad_config.exit_code == 2
    assert "config file not found" in bad_config.output
    help_text = runner.invoke(app, ["check", "--help"]).output
    assert "Exit codes" in help_text


def test_baseline_regression(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    baseline = tmp_path / "baseline.json"
    made = runner.invoke(app, ["check", str(models["balanced"]), *ARCH, "--format", "json", "-o", str(baseline)])
    assert made.exit_code == 0, made.output
    same = runner.invoke(app, ["check", str(models["balanced"]), *ARCH, "--baseline", str(baseline)])
    assert same.exit_code == 0, same.output
    worse = runner.invoke(
        app, ["check", str(models["shifted"]), *ARCH, "--baseline", str(baseline), "--format", "json"]
    )
    assert worse.exit_code == 1, worse.output
    checks = {c["name"]: c for c in json.loads(worse.output)["checks"]}
    assert checks["baseline:imbalance"]["status"] == FAIL
    assert checks["baseline:log10-intrinsic-norm"]["status"] == PASS  # invariant under the shift
    assert checks["baseline:log10-gradient-bound"]["status"] == PASS
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = runner.invoke(app, ["check", str(models["balanced"]), *ARCH, "--baseline", str(broken)])
    assert result.exit_code == 2
    assert "cannot read baseline" in result.output


def test_formats(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths = [str(models["balanced"]), str(models["shifted"])]
    rules = ["--max-imbalance", "1", "--min-coverage", "0.5"]
    result = runner.invoke(app, ["check", *paths, *ARCH, *rules, "--format", "json"])
    documents = json.loads(result.output)
    assert isinstance(documents, list) and len(documents) == 2
    assert documents[0]["schema_version"] == 2 and "summary" in documents[0]
    assert {c["name"] for c in documents[1]["checks"]} == {"self-check", "max-imbalance", "min-coverage", "findings"}
    assert set(documents[1]["checks"][0]) == {"name", "status", "value", "threshold", "message"}
    assert [d["exit_code"] for d in documents] == [0, 1]

    out = tmp_path / "junit.xml"
    result = runner.invoke(app, ["check", *paths, *ARCH, *rules, "--format", "junit", "--output", str(out)])
    assert result.exit_code == 1
    root = ET.parse(out).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "8" and root.get("failures") == "1"
    assert len(root.findall("testsuite")) == 2
    failed = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failed] == [(paths[1], "max-imbalance")]

    result = runner.invoke(app, ["check", *paths, *ARCH, *rules, "--format", "github"])
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"::error file={paths[1]},title=wssi-audit max-imbalance::")
    assert lines[-1].startswith("::notice")

    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = runner.invoke(app, ["check", *paths, *ARCH, *rules, "--format", "json"])
    assert "::error file=" in result.output  # annotations added automatically (on stderr)
    assert result.exit_code == 1


def test_inconsistency_exit_code(monkeypatch: pytest.MonkeyPatch, models: dict[str, Path], tmp_path: Path) -> None:
    """A chain failing the self-check (an analyzer bug: here sigmoid is mis-classified as homogeneous)
    exits 3, ahead of rule failures."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 2))
    path = tmp_path / "sigmoid.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(path))
    monkeypatch.setitem(OP_TABLE, "sigmoid", OpSpec(Role.HOMOGENEOUS, lipschitz=0.25))
    result = runner.invoke(app, ["check", str(path), "--max-imbalance", "0"])
    assert result.exit_code == 3, result.output
    results = run_checks({"summary": {}, "trace": {"coverage": 1.0}, "chains": []}, Rules())
    assert [r.status for r in results] == [PASS, PASS]
    _ = SKIP
