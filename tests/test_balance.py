"""Rebalancing: equal layer norms, same function, same intrinsic norm, every output format;
and `wssi-audit export --onnx` checked against the torch model in onnxruntime."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from wssi_audit.auditing import audit
from wssi_audit.balance import balance, save_balanced
from wssi_audit.cli import app
from wssi_audit.errors import InputError
from wssi_audit.loading import load_model
from wssi_audit.models import INPUT_SHAPES, create_model

runner = CliRunner()


def _model(name: str, spread: float = 2.0) -> torch.nn.Module:
    """An example model pushed far from balance by a random function-preserving shift."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.running_mean.normal_(generator=generator)
                module.weight.uniform_(0.5, 2.0, generator=generator)
    if name == "mlp":  # layers x100, x1, x1, x0.01
        with torch.no_grad():
            model[1].weight.mul_(10**spread)
            for index in (1, 3, 5):
                model[index].bias.mul_(10**spread)
            model[7].weight.mul_(10**-spread)
    return model


@pytest.mark.parametrize("name", ["mlp", "resnet_bn", "resnet_nobn"])
def test_balance_module(name: str) -> None:
    model = _model(name)
    x = torch.randn(INPUT_SHAPES[name])
    before = audit(model, (x,))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = balance(model, (x,))
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # input untouched
    after = audit(result.model, (x,))
    assert after.summary.max_imbalance_decades < 1e-6  # the written model holds float32 tensors
    assert result.max_imbalance_after < 1e-9
    assert result.check_dtype == "float64" and result.max_relative_error < 1e-9
    # Chains inside residual branches keep their intrinsic norms; stem and head trade +-log10 a.
    branch_chains = {block.chain for block in before.residual_blocks}
    for old, new in zip(before.chains, after.chains):
        if name == "mlp" or old.id in branch_chains:
            assert math.isclose(old.log10_intrinsic_norm, new.log10_intrinsic_norm, abs_tol=1e-6)
    assert math.isclose(result.log10_intrinsic_before, result.log10_intrinsic_after, abs_tol=1e-9)
    assert math.isclose(
        before.summary.gradient.log10_frobenius_bound, after.summary.gradient.log10_frobenius_bound, abs_tol=1e-6
    )
    assert result.residual_stream is (name != "mlp")
    if result.residual_stream:
        # Stem and head at one common norm: the weight-decay penalty is lower than in-chain balancing alone.
        chains_only = balance(model, (x,), residual_stream=False)
        assert not chains_only.residual_stream
        assert result.weight_decay_after < chains_only.weight_decay_after
        stem, head = after.layers[0], after.layers[-1]
        assert math.isclose(stem.log10_frobenius, head.log10_frobenius, abs_tol=1e-6)
    assert result.weight_decay_after <= result.weight_decay_before + 1e-9
    with torch.no_grad():  # the written model holds float32 weights: float32 rounding only
        reference = model(x)
        assert (result.model(x) - reference).abs().max() <= 1e-5 * reference.abs().max()
    if name == "mlp":
        assert result.weight_decay_after < 0.01 * result.weight_decay_before
        assert result.chains_balanced == 1


def test_balance_cli_state_dict_and_pt2(tmp_path: Path) -> None:
    model = _model("mlp")
    x = torch.randn(INPUT_SHAPES["mlp"])
    state = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), state)
    before = state.read_bytes()
    out = tmp_path / "balanced.pt"
    args = ["--arch", "wssi_audit.models:mlp", "--input-shape", "2,1,8,8"]
    result = runner.invoke(app, ["balance", str(state), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    assert "sum ||W||^2" in result.output and "log10 intrinsic norm" in result.output
    assert state.read_bytes() == before
    balanced = load_model(out, arch="wssi_audit.models:mlp").model
    assert isinstance(torch.load(out, weights_only=True), dict)  # still a state dict
    with torch.no_grad():
        assert torch.allclose(balanced(x), model(x), rtol=1e-4, atol=1e-5)
    assert audit(balanced, (x,)).summary.max_imbalance_decades < 1e-5

    program_path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (x,)), program_path)
    out2 = tmp_path / "balanced.pt2"
    result = runner.invoke(app, ["balance", str(program_path), "-o", str(out2)])
    assert result.exit_code == 0, result.output
    program = torch.export.load(out2)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), rtol=1e-4, atol=1e-5)
    assert audit(program).summary.max_imbalance_decades < 1e-5

    # Errors: the output may not overwrite the input; no example input for a state dict.
    same = runner.invoke(app, ["balance", str(state), "-o", str(state), *args])
    assert same.exit_code == 2 and state.read_bytes() == before
    no_input = runner.invoke(app, ["balance", str(state), "-o", str(tmp_path / "x.pt"), "--arch", args[1]])
    assert no_input.exit_code == 2, no_input.output
    assert "--input-shape" in no_input.output
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(InputError):
        balance(model)


def test_program_audit_leaves_program_untouched() -> None:
    """Regression: the export runner converted the program's own parameters to float64."""
    model = _model("mlp")
    x = torch.randn(INPUT_SHAPES["mlp"])
    program = torch.export.export(model, (x,))
    audit(program, (x,))
    assert {v.dtype for v in program.state_dict.values()} == {torch.float32}
    with torch.no_grad():
        program.module()(x)


def _onnx_run(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("source", ["state_dict", "pt2"])
def test_export_onnx_matches_torch(source: str, tmp_path: Path) -> None:
    model = _model("resnet_bn")
    x = torch.randn(INPUT_SHAPES["resnet_bn"])
    if source == "state_dict":
        path = tmp_path / "m.pt"
        torch.save(model.state_dict(), path)
        args = ["--arch", "wssi_audit.models:resnet_bn", "--input-shape", "2,1,8,8"]
    else:
        path = tmp_path / "m.pt2"
        torch.export.save(torch.export.export(model, (x,)), path)
        args = []
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(path), "--onnx", str(out), *args])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "m.onnx"])  # one file, no temp left
    onnx.checker.check_model(onnx.load(str(out)))
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.allclose(_onnx_run(out, x), expected, rtol=1e-4, atol=1e-5)
    if source == "state_dict":  # dynamic batch
        x5 = torch.randn(5, 1, 8, 8)
        with torch.no_grad():
            assert np.allclose(_onnx_run(out, x5), model(x5).numpy(), rtol=1e-4, atol=1e-5)

    # Balancing the ONNX file rewrites its initializers; outputs stay (float32 in onnxruntime).
    balanced = tmp_path / "balanced.onnx"
    result = runner.invoke(app, ["balance", str(out), "-o", str(balanced)])
    assert result.exit_code == 0, result.output
    assert "float32" in result.output
    assert np.allclose(_onnx_run(balanced, x), expected, rtol=1e-4, atol=1e-4)
    assert audit(str(balanced)).summary.max_imbalance_decades < 1e-5
    assert balance(str(out)).format == "onnx"  # the Python API takes a path too


def test_export_errors(tmp_path: Path) -> None:
    state = tmp_path / "m.pt"
    torch.save(create_model("mlp").state_dict(), state)
    result = runner.invoke(
        app, ["export", str(state), "--onnx", str(tmp_path / "o.onnx"), "--arch", "wssi_audit.models:mlp"]
    )
    assert result.exit_code == 2 and "--input-shape" in result.output
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.pt"), "--onnx", str(tmp_path / "o.onnx")])
    assert missing.exit_code == 2
    assert not (tmp_path / "o.onnx").exists()


def test_save_balanced_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = _model("mlp")
    result = balance(model, (torch.randn(2, 1, 8, 8),))
    save_balanced(result, tmp_path / "b.safetensors")
    state = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(state["1.weight"], result.model.state_dict()["1.weight"])


def test_shift_layers_with_stream_scales() -> None:
    """A chain whose input is scaled by a and whose output must be scaled by b (shared code)."""
    from wssi_audit.analysis.structure import find_structure
    from wssi_audit.analysis.weights import shift_layers
    from wssi_audit.frontends import build_graph

    model = _model("mlp", spread=0.0).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    graph = build_graph(model, (x,))
    chain = find_structure(graph).chains[0]
    log_in, log_out = 0.7, -0.4
    factors = [0.3, -0.2, 0.1, (log_out - log_in) - 0.2]
    overrides = shift_layers(chain.layers, factors, graph.tensors, log10_input_scale=log_in, log10_output_scale=log_out)
    shifted = copy.deepcopy(model)
    shifted.load_state_dict({**model.state_dict(), **overrides})
    with torch.no_grad():
        assert torch.allclose(shifted(x * 10**log_in), model(x) * 10**log_out, rtol=1e-12, atol=1e-12)
    # The defaults are the plain shift (output unchanged).
    plain = shift_layers(chain.layers, [0.5, -0.5, 0.25, -0.25], graph.tensors)
    shifted.load_state_dict({**model.state_dict(), **plain})
    with torch.no_grad():
        assert torch.allclose(shifted(x), model(x), rtol=1e-12, atol=1e-12)


def _mlp(dropout: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 16), torch.nn.ReLU()] + ([torch.nn.Dropout(0.5)] if dropout else [])
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("case", ["nan-weight", "training-dropout"])
def test_a_model_balance_cannot_act_on_is_an_input_error_that_says_why(tmp_path: Path, case: str) -> None:
    """Both were exit 3 ("failed the self-check" / "rebalancing changed the outputs"), blaming the
    analyzer for a broken model or a random one. Control: the same model in eval mode with finite
    weights is balanced."""
    model = _mlp(dropout=case == "training-dropout")
    if case == "nan-weight":
        with torch.no_grad():
            model[0].weight[0, 0] = math.nan
        model.eval()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(4, 8),)), str(path))  # dropout: still in train mode
    result = runner.invoke(app, ["balance", str(path), "-o", str(tmp_path / "out.pt2")])
    assert result.exit_code == 2, result.output
    assert ("nothing to rebalance" if case == "nan-weight" else "eval mode") in result.output
    assert not (tmp_path / "out.pt2").exists()
    honest = tmp_path / "honest.pt2"
    torch.export.save(torch.export.export(_mlp(dropout=True).eval(), (torch.randn(4, 8),)), str(honest))
    assert runner.invoke(app, ["balance", str(honest), "-o", str(tmp_path / "out.pt2")]).exit_code == 0
