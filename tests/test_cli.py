"""The audit CLI through typer's runner: formats, output files, shorthand, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import example_model
from wssi_audit import cli
from wssi_audit.cli import app
from wssi_audit.ops import OP_TABLE, OpSpec, Role

runner = CliRunner()


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    model, x = example_model("resnet_bn")
    path = tmp_path_factory.mktemp("models") / "resnet_bn.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return path


def test_table_report_names_chains_blocks_and_self_check(pt2):
    result = runner.invoke(app, ["audit", str(pt2), "--layers"])
    assert result.exit_code == 0, result.output
    for text in ("Homogeneous chains", "Residual blocks", "projection", "all chains", "Layers", "layers.2.conv1"):
        assert text in result.output


def test_json_report_follows_the_contract(pt2):
    result = runner.invoke(app, ["audit", str(pt2), "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema_version"] == 2
    assert document["tool"]["name"] == "wssi-audit"
    assert set(document) >= {"model", "trace", "layers", "chains", "residual_blocks", "barriers", "summary"}
    assert set(document["summary"]) >= {
        "chains",
        "residual_blocks",
        "homogeneous_weight_fraction",
        "max_imbalance_decades",
        "gradient",
        "all_verified",
        "verification",
    }
    assert set(document["summary"]["gradient"]) >= {"log10_frobenius_bound", "log10_certified_bound", "log10_measured"}
    assert isinstance(document["findings"], list)
    layer = document["layers"][0]
    assert set(layer) >= {"name", "weight", "kind", "shape", "frobenius", "spectral", "bias_norm", "folded_bn"}
    assert layer["folded_bn"] == "stem_bn"
    chain = document["chains"][1]
    assert set(chain) >= {"id", "weights", "log10_intrinsic_norm", "imbalance_decades", "wd_excess", "verification"}
    block = document["residual_blocks"][2]
    assert block["shortcut"] == "projection" and block["shortcut_weight"] == "layers.2.downsample.0.weight"


def test_spectral_estimate_never_exceeds_frobenius_and_matches_svd(pt2):
    from wssi_audit import analyze
    from wssi_audit.analysis.weights import effective_weight

    analysis = analyze(pt2)
    for layer, record in zip(analysis.structure.layers, analysis.report.layers, strict=True):
        weight, _ = effective_weight(layer, analysis.graph.tensors)
        exact = float(torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2))
        assert record.spectral <= record.frobenius * (1 + 1e-12)
        assert record.spectral == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize(
    ("fmt", "marker"), [("json", '"schema_version"'), ("markdown", "# wssi-audit report"), ("table", "wssi-audit")]
)
def test_output_file_in_every_format(tmp_path, pt2, fmt, marker):
    target = tmp_path / "out" / f"report.{fmt}"
    result = runner.invoke(app, ["audit", str(pt2), "--format", fmt, "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert marker in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary leftovers


def test_no_output_file_is_left_on_error(tmp_path):
    target = tmp_path / "report.json"
    result = runner.invoke(app, ["audit", str(tmp_path / "missing.pt2"), "--format", "json", "--output", str(target)])
    assert result.exit_code == 2
    assert not target.exists()


def test_bare_model_argument_means_audit(pt2, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(pt2), "--format", "json"])
    assert exit_info.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["summary"]["all_verified"] is True


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).output.startswith("wssi-audit ")
    help_text = runner.invoke(app, ["--help"]).output
    assert "Exit codes" in help_text and "audit" in help_text


def test_unknown_flag_is_a_usage_error(pt2):
    result = runner.invoke(app, ["audit", str(pt2), "--no-such-flag"])
    assert result.exit_code == 2


def test_a_false_claim_is_caught_by_the_self_check_and_exits_3(tmp_path, monkeypatch):
    """Mis-classify sigmoid as homogeneous: the analyzer then claims a wrong chain, and the
    numerical scale-shift check must catch it, say so loudly and exit 3."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 2))
    path = tmp_path / "sigmoid.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(path))
    monkeypatch.setitem(OP_TABLE, "sigmoid", OpSpec(Role.HOMOGENEOUS, lipschitz=0.25))
    result = runner.invoke(app, ["audit", str(path)])
    assert result.exit_code == 3
    assert "ANALYZER INCONSISTENCY" in result.output and "FAILED" in result.output
    result = runner.invoke(app, ["audit", str(path), "-f", "json"])
    document = json.loads(result.stdout)
    assert document["chains"][0]["verification"] == "failed" and document["summary"]["all_verified"] is False
    assert any(f["code"] == "self_check_failed" and f["severity"] == "error" for f in document["findings"])


def test_demo_command_trains_saves_and_audits(tmp_path):
    result = runner.invoke(app, ["demo", "--output-dir", str(tmp_path), "--arch", "mlp", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "digits_mlp.pt2").exists()
    assert "test accuracy" in result.output and "all chains" in result.output


def test_experiment_on_cuda_without_cuda_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["experiment", "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_the_console_script_keeps_exit_codes_and_whole_outputs_when_it_skips_teardown(pt2, tmp_path):
    """The console entry ends analysis commands with os._exit after flushing (cli.FAST_EXIT_COMMANDS):
    a real process must still give the documented exit codes, a complete stdout and complete files."""
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wssi_audit", *args], capture_output=True, text=True, timeout=600)

    report = tmp_path / "report.json"
    done = run(str(pt2), "--no-measure", "-f", "json", "-o", str(report))
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["schema_version"] == 2
    piped = run(str(pt2), "--no-measure", "-f", "json")
    assert piped.returncode == 0 and json.loads(piped.stdout)["model"]["format"] == "torch.export"
    failed = run("check", str(pt2), "--no-measure", "--max-imbalance", "0")
    assert failed.returncode == 1 and "max-imbalance" in failed.stdout
    missing = run(str(tmp_path / "absent.pt2"))
    assert missing.returncode == 2 and "no such file" in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr
    assert cli.FAST_EXIT_COMMANDS.isdisjoint({"finetune", "experiment", "demo"})


def test_only_a_short_run_of_its_own_collects_cycles_less_often():
    """A real process of an analysis command raises the collector's thresholds (cli.SHORT_RUN_GC_THRESHOLDS);
    a training command keeps Python's, and `main(argv)` called in a caller's process leaves the
    caller's alone."""
    import gc
    import subprocess
    import sys

    probe = (
        "import gc, os, sys; from wssi_audit import cli; real = os._exit\n"
        "def report(code): print(gc.get_threshold()); sys.stdout.flush(); real(code)\n"
        "os._exit = report; sys.argv = ['wssi-audit', *sys.argv[1:]]\n"
        "try: cli.main()\n"
        "except SystemExit: report(0)\n"
    )

    def thresholds(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300)
        return done.stdout.strip().splitlines()[-1]

    assert thresholds("schema") == str(cli.SHORT_RUN_GC_THRESHOLDS)
    assert thresholds("finetune", "--help") == str(gc.get_threshold()) != str(cli.SHORT_RUN_GC_THRESHOLDS)
    before = gc.get_threshold()
    with pytest.raises(SystemExit):
        cli.main(["schema"])
    assert gc.get_threshold() == before
