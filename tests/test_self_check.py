"""The self-check has power: false chains fail wherever their effect shows, dead chains are
unverifiable, and non-finite or all-zero weights are findings, never normal-looking numbers."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from wssi_audit import audit
from wssi_audit.cli import app
from wssi_audit.ops import OP_TABLE, OpSpec, Role

runner = CliRunner()


class Hidden(nn.Module):
    """A big plain path plus a chain whose effect on the output is scaled by `weight` (1e-9):
    the model output cannot show whether the chain's claim holds, its own end can."""

    def __init__(self, activation: nn.Module, weight: float = 1e-9) -> None:
        super().__init__()
        self.main = nn.Linear(8, 4)
        self.a = nn.Linear(8, 16)
        self.act = activation
        self.b = nn.Linear(16, 4)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.weight * self.b(self.act(self.a(x)))


ACTIVATIONS = {"relu6": nn.ReLU6, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}
# The op table rows each activation reaches (torch.export writes ReLU6 as hardtanh(0, 6)).
ROWS = {"relu6": ("relu6", "hardtanh"), "silu": ("silu",), "sigmoid": ("sigmoid",)}


def _call_homogeneous(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    for row in ROWS[op]:
        monkeypatch.setitem(OP_TABLE, row, OpSpec(Role.HOMOGENEOUS, lipschitz=1.0))


def _save(model: nn.Module, path: Path, shape: tuple[int, ...] = (4, 8)) -> Path:
    torch.manual_seed(0)
    torch.export.save(torch.export.export(model.eval(), (torch.randn(shape),)), str(path))
    return path


@pytest.mark.parametrize("op", sorted(ACTIVATIONS))
@pytest.mark.parametrize("hidden", [False, True], ids=["plain", "effect-1e-9"])
def test_misclassified_activation_fails_its_chain(
    op: str, hidden: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(1)
    model = (
        Hidden(ACTIVATIONS[op]()) if hidden else nn.Sequential(nn.Linear(8, 16), ACTIVATIONS[op](), nn.Linear(16, 4))
    )
    path = _save(model, tmp_path / f"{op}.pt2")
    _call_homogeneous(monkeypatch, op)
    report = audit(path)
    chain = next(c for c in report.chains if len(c.layers) == 2)
    assert chain.verification == "failed", (chain.verification, chain.verification_error)
    assert report.summary.all_verified is False
    if hidden:  # the model output alone could not tell: the global comparison stays within tolerance
        assert report.summary.global_verification_error is not None
        assert report.summary.global_verification_error < 1e-6
    result = runner.invoke(app, ["audit", str(path)])
    assert result.exit_code == 3, result.output
    assert "ANALYZER INCONSISTENCY" in result.output


def test_relu6_is_caught_although_its_activations_stay_below_6(tmp_path: Path, monkeypatch) -> None:
    """Activations far below the clipping threshold: only a shift that pushes them up sees ReLU6."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU6(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.zero_()
    path = _save(model, tmp_path / "small.pt2")
    _call_homogeneous(monkeypatch, "relu6")
    assert audit(path).chains[0].verification == "failed"


def test_true_chains_verify_with_a_control_that_moved_them(tmp_path: Path) -> None:
    torch.manual_seed(3)
    report = audit(_save(Hidden(nn.ReLU()), tmp_path / "relu.pt2"))
    chain = next(c for c in report.chains if len(c.layers) == 2)
    assert chain.verification == "verified"
    assert chain.verification_error < 1e-12
    assert chain.verification_power > 1e-3  # the control moved the checked tensor by far more than 1e-9


def test_dead_chain_is_unverifiable_not_verified(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU output is zero
    path = _save(model, tmp_path / "dead.pt2")
    report = audit(path)
    assert report.chains[0].verification == "unverifiable"
    assert "no power" in report.chains[0].verification_reason
    assert report.summary.all_verified is False
    assert {f.code for f in report.findings} >= {"unverifiable_chain"}
    gate = runner.invoke(app, ["check", str(path), "--require-verified", "--format", "json"])
    assert gate.exit_code == 1
    checks = {c["name"]: c for c in json.loads(gate.stdout)["checks"]}
    assert checks["require-verified"]["status"] == "fail" and "unverifiable" in checks["require-verified"]["message"]
    table = runner.invoke(app, ["audit", str(path)])
    assert table.exit_code == 0 and "unverifiable" in table.output


@pytest.mark.parametrize(
    "where", ["weight-nan", "weight-inf", "bias-nan", "bn-running-var-nan", "bn-running-mean-inf", "bn-gamma-nan"]
)
def test_non_finite_tensors_are_findings_not_numbers(where: str, tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    target = {
        "weight-nan": (model[0].weight, math.nan),
        "weight-inf": (model[0].weight, math.inf),
        "bias-nan": (model[0].bias, math.nan),
        "bn-running-var-nan": (model[1].running_var, math.nan),
        "bn-running-mean-inf": (model[1].running_mean, -math.inf),
        "bn-gamma-nan": (model[1].weight, math.nan),
    }[where]
    with torch.no_grad():
        target[0].view(-1)[3] = target[1]
    path = _save(model, tmp_path / "broken.pt2")
    result = runner.invoke(app, ["audit", str(path), "--format", "json"])
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout)  # valid JSON: no NaN or Infinity literals
    layer = document["layers"][0]
    assert layer["status"] == "non_finite"
    assert layer["log10_frobenius"] is None and layer["frobenius"] is None
    assert document["layers"][1]["status"] == "ok"
    assert document["chains"][0]["verification"] == "failed"
    assert "non-finite" in document["chains"][0]["verification_reason"]
    assert document["summary"]["gradient"]["log10_frobenius_bound"] is None
    assert document["findings"][0]["code"] == "non_finite_weights" and document["findings"][0]["severity"] == "error"
    table = runner.invoke(app, ["audit", str(path)])
    assert "-inf" not in table.output and "non_finite_weights" not in table.output
    assert "NaN or Inf" in table.output
    assert runner.invoke(app, ["check", str(path)]).exit_code == 1  # check fails by default
    assert runner.invoke(app, ["check", str(path), "--fail-on", "none"]).exit_code == 0


def _batchnorm_net(eps: float) -> nn.Module:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, eps=eps), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.1, 0.9)  # var + eps < 0 for eps -1
    return model


def test_a_batchnorm_eps_that_folds_to_nan_is_non_finite(tmp_path: Path) -> None:
    """Every tensor finite, but gamma / sqrt(var + eps) is not (found by a sweep of node arguments:
    the layer was "ok" with its norms missing and no finding). Control: eps 1e-5 is ok. A NaN eps
    also reaches the audit through a .pt2: torch writes it as the string "NaN", and the reader
    reads it back as torch's loader does."""
    reports = {}
    for eps in (1e-5, math.nan):
        path = _save(_batchnorm_net(eps), tmp_path / "eps.pt2")
        result = runner.invoke(app, ["audit", str(path), "--format", "json"])
        reports[eps] = (result.exit_code, json.loads(result.stdout))
    code, honest = reports[1e-5]
    assert code == 0 and honest["layers"][0]["status"] == "ok"
    code, broken = reports[math.nan]
    assert code == 1 and broken["layers"][0]["status"] == "non_finite"
    assert broken["findings"][0]["code"] == "non_finite_weights" and broken["findings"][0]["severity"] == "error"
    chain = broken["chains"][0]
    assert chain["verification"] == "failed" and "fold of" in chain["verification_reason"]
    # A negative eps: torch.export (and torch's kernel) refuse it, a crafted file need not.
    path = _save(_batchnorm_net(1e-5), tmp_path / "negative.pt2")
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(name, data.replace(b'{"as_float": 1e-05}', b'{"as_float": -1.0}'))
    with zipfile.ZipFile(path) as archive:
        assert any(b'{"as_float": -1.0}' in archive.read(name) for name in archive.namelist())
    report = audit(path)
    assert report.layers[0].status == "non_finite" and report.findings[0].code == "non_finite_weights"


def test_an_all_zero_layer_is_zero_not_non_finite(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.zero_()
    path = _save(model, tmp_path / "zero.pt2")
    document = json.loads(runner.invoke(app, ["audit", str(path), "--format", "json"]).stdout)
    layer = document["layers"][1]
    assert layer["status"] == "zero" and layer["log10_frobenius"] is None and layer["frobenius"] == 0.0
    codes = {f["code"]: f["severity"] for f in document["findings"]}
    assert codes.get("zero_layer") == "warning" and "non_finite_weights" not in codes


class _Tied(nn.Module):
    """Two layers sharing one weight tensor: swapping it must reach both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _only(value: object) -> torch.Tensor:
    while isinstance(value, (tuple, list)):
        (value,) = value
    assert isinstance(value, torch.Tensor)
    return value


@pytest.mark.parametrize("method", ["export", "fx"])
def test_the_runners_two_ways_of_swapping_tensors_agree(method: str) -> None:
    """The self-check swaps tensors at get_attr (torch.export graphs) or by functional_call
    (leaf modules of a symbolic trace); both give the module's own output with the tensor really
    replaced, tied uses included (the reference: the module itself with the weight assigned)."""
    from wssi_audit.frontends import graph_from_module

    torch.manual_seed(0)
    model, x = _Tied().eval(), torch.randn(3, 4)
    graph = graph_from_module(model, (x,), method)
    graph.runner.run({})
    direct = graph.runner._aliases is not None  # type: ignore[attr-defined]
    assert direct == (method == "export")
    key = next(k for k in graph.tensors if k.endswith("weight"))
    replacement = torch.randn(4, 4, dtype=torch.float64)
    swapped = _only(graph.runner.run({key: replacement})[graph.runner.OUTPUT])
    with torch.no_grad():
        model.a.weight.copy_(replacement.float())
        expected = model.double()(x.double())
    assert torch.allclose(swapped, expected, atol=1e-12)
    if direct:  # the other way, on the same graph, agrees
        graph.runner._aliases = None  # type: ignore[attr-defined]
        again = _only(graph.runner.run({key: replacement})[graph.runner.OUTPUT])
        assert torch.allclose(again, swapped, atol=1e-12)


def test_dropout_in_training_mode_is_a_random_barrier_not_an_analyzer_bug(tmp_path: Path) -> None:
    """A program exported without model.eval() keeps aten.dropout(x, p, train=True): a new mask at
    every run, so shifted runs differed and the audit blamed itself (exit 3, found by a sweep of
    node arguments). Now the dropout splits the chain, both sides verify, and the global check
    says why it is skipped. Control: the same model in eval mode is one chain."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    reports = {}
    for mode in ("train", "eval"):
        path = tmp_path / f"{mode}.pt2"
        torch.export.save(torch.export.export(getattr(model, mode)(), (torch.randn(4, 8),)), str(path))
        result = runner.invoke(app, ["audit", str(path), "--format", "json"])
        reports[mode] = (result.exit_code, json.loads(result.stdout))
    code, trained = reports["train"]
    assert code == 0, trained["findings"]
    assert [len(c["layers"]) for c in trained["chains"]] == [1, 2]
    assert trained["chains"][1]["verification"] == "verified"
    assert "draws random numbers" in trained["summary"]["verification_note"]
    assert any("dropout in training mode" in b["reason"] for b in trained["barriers"])
    code, evaluated = reports["eval"]
    assert code == 0 and [len(c["layers"]) for c in evaluated["chains"]] == [3]
