"""ONNX front-end: same chains and norms as the torch audit, hand-built graphs, bad files."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from wssi_audit.auditing import analyze, analyze_graph, audit
from wssi_audit.cli import app
from wssi_audit.errors import InputError
from wssi_audit.frontends import build_graph
from wssi_audit.frontends.onnx_frontend import graph_from_onnx, load_onnx
from wssi_audit.models import INPUT_SHAPES, create_model

runner = CliRunner()


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, **kwargs) -> onnx.ModelProto:
    """The legacy (TorchScript) exporter works offline and keeps initializer names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, **kwargs)
    return onnx.load(str(path))


def _randomize_bn(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so that folding changes the norms."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(module.bias.shape, generator=generator))


# Exported with constant folding (BatchNorm folded into the convs by the exporter) and, for the
# BN model, without (BatchNormalization nodes that the analysis folds itself).
@pytest.mark.parametrize(
    ("name", "fold"), [("mlp", True), ("cnn", True), ("resnet_bn", True), ("resnet_bn", False), ("resnet_nobn", True)]
)
def test_onnx_audit_matches_torch_audit(name: str, fold: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        _randomize_bn(model)
    x = torch.randn(INPUT_SHAPES[name])
    reference = audit(model, (x,))
    kwargs = {} if fold else {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, x, path, **kwargs)
    report = analyze(path).report  # through loading.py, default inputs from the model's shapes
    assert report.model.format == "onnx"
    assert report.trace.method == "onnx"
    assert report.trace.coverage == 1.0
    assert [len(c.layers) for c in report.chains] == [len(c.layers) for c in reference.chains]
    assert [(b.shortcut, len(b.branch_weights)) for b in report.residual_blocks] == [
        (b.shortcut, len(b.branch_weights)) for b in reference.residual_blocks
    ]
    assert len(report.layers) == len(reference.layers)
    for ours, theirs in zip(report.layers, reference.layers):
        assert math.isclose(ours.frobenius, theirs.frobenius, rel_tol=1e-5), (ours.name, theirs.name)
        assert ours.kind == theirs.kind
    assert math.isclose(
        report.summary.gradient.log10_frobenius_bound, reference.summary.gradient.log10_frobenius_bound, rel_tol=1e-5
    )
    assert report.summary.all_verified is True
    if name == "resnet_bn" and not fold:
        assert all(layer.folded_bn for layer in report.layers if layer.kind.startswith("conv"))
    if name != "resnet_bn" or not fold:
        # Layer names come from the initializer names, or from the exporter's module scopes.
        assert [layer.name for layer in report.layers] == [layer.name for layer in reference.layers]


def _gemm_model(trans_b: int, alpha: float, beta: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4)).astype(np.float32)  # (out, in)
    w2 = rng.standard_normal((3, 8)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    b2 = rng.standard_normal(3).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1 if trans_b else w1.T.copy(), "fc1.weight"),
        numpy_helper.from_array(b1, "fc1.bias"),
        numpy_helper.from_array(w2.T.copy(), "fc2.weight"),  # MatMul + Add: (in, out)
        numpy_helper.from_array(b2, "fc2.bias"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=trans_b, alpha=alpha, beta=beta),
        helper.make_node("LeakyRelu", ["h"], ["a"], alpha=0.2),
        helper.make_node("Mul", ["a", "half"], ["s"]),
        helper.make_node("MatMul", ["s", "fc2.weight"], ["m"]),
        helper.make_node("Add", ["m", "fc2.bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("trans_b", "alpha", "beta"), [(1, 1.0, 1.0), (0, 2.0, 0.5)])
def test_gemm_and_matmul_add_become_linear(trans_b: int, alpha: float, beta: float) -> None:
    model = _gemm_model(trans_b, alpha, beta)
    graph = build_graph(model)
    ops = [node.op for node in graph.nodes.values()]
    assert ops == ["input", "linear", "leaky_relu", "scale", "linear", "output"]
    linear = [node for node in graph.nodes.values() if node.op == "linear"]
    assert linear[0].params == {"weight": "fc1.weight", "bias": "fc1.bias"}
    assert linear[1].params == {"weight": "fc2.weight", "bias": "fc2.bias"}
    assert graph.tensors["fc1.weight"].shape == (8, 4)  # torch layout (out, in) whatever transB
    assert graph.tensors["fc2.weight"].shape == (3, 8)
    assert graph.nodes[linear[0].name].inputs == ["x"]
    assert next(n for n in graph.nodes.values() if n.op == "leaky_relu").attrs == {"negative_slope": 0.2}
    # The effective weight includes alpha (and the bias beta), in torch layout.
    w_eff = graph.tensors["fc1.weight"].double()
    raw = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    expected = alpha * (raw if trans_b else raw.T)
    assert np.allclose(w_eff.numpy(), expected)
    assert np.allclose(graph.tensors["fc1.bias"].numpy(), beta * numpy_helper.to_array(model.graph.initializer[1]))
    report = analyze_graph(graph).report
    assert [len(c.layers) for c in report.chains] == [2]
    assert report.chains[0].verification == "verified"  # the runner writes alpha / transpose back correctly


def test_barriers_and_unknown_ops() -> None:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w3"),
        numpy_helper.from_array(np.ones(4, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h1"], transB=1),
        helper.make_node("Sigmoid", ["h1"], ["g"]),
        helper.make_node("Mul", ["h1", "g"], ["s"]),  # swish gate: product of activations
        helper.make_node("Gemm", ["s", "w2"], ["h2"], transB=1),
        helper.make_node("Sin", ["h2"], ["q"]),  # not in the table: unknown
        helper.make_node("Add", ["q", "one"], ["r"]),  # constant offset
        helper.make_node("Gemm", ["r", "w3"], ["y"], transB=1),
    ]
    graph_proto = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
    graph = graph_from_onnx(model)
    ops = [node.op for node in graph.nodes.values()]
    assert ops == ["input", "linear", "sigmoid", "mul", "linear", "Sin", "add_const", "linear", "output"]
    report = analyze_graph(graph).report
    assert sorted(b.op for b in report.barriers) == ["add_const", "mul", "sigmoid"]
    assert [u.node for u in report.trace.unanalyzed] == ["Sin_4"]
    assert report.trace.coverage < 1.0
    assert all(len(c.layers) == 1 for c in report.chains)


def _mlp_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    export_onnx(create_model("mlp"), torch.randn(INPUT_SHAPES["mlp"]), path)
    return path


def test_malformed_and_truncated_files(tmp_path: Path) -> None:
    good = _mlp_onnx(tmp_path)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe this is not protobuf \x00\x01" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(InputError):
            load_onnx(path)
        result = runner.invoke(app, ["audit", str(path)])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) <= 2


def test_cli_audit_onnx_json(tmp_path: Path) -> None:
    import json

    path = _mlp_onnx(tmp_path)
    result = runner.invoke(app, ["audit", str(path), "--format", "json", "--input-shape", "2,1,8,8"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["model"]["format"] == "onnx"
    assert document["summary"]["chains"] == 1
    assert document["summary"]["all_verified"] is True
    # The export fixed the batch size at 2: another shape is the user's input error.
    result = runner.invoke(app, ["audit", str(path), "--input-shape", "3,1,8,8"])
    assert result.exit_code == 2, result.output
    assert "does not run on inputs of shape 3,1,8,8" in result.output


class _Mixed(torch.nn.Module):
    """Conv-transpose, PReLU, LeakyReLU, average pooling, a channel concat and a sigmoid head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.act = torch.nn.PReLU(4)
        self.pool = torch.nn.AvgPool2d(2)
        self.leaky = torch.nn.LeakyReLU(0.1)
        self.head = torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        x = self.pool(self.act(self.up(x)))
        return torch.sigmoid(self.head(torch.flatten(self.leaky(x), 1)))


def test_more_ops_match_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = _Mixed().eval(), torch.randn(2, 1, 8, 8)
    reference = audit(model, (x,))
    report = audit(export_onnx(model, x, tmp_path / "mixed.onnx"))
    graph = build_graph(onnx.load(str(tmp_path / "mixed.onnx")))
    ops = {n.op for n in graph.nodes.values()}
    assert {"cat", "conv_transpose", "prelu", "avg_pool", "leaky_relu", "sigmoid"} <= ops
    # Weight-layer attributes in the FX converter's form, so analyses cannot tell the front-ends apart.
    convs = [n.attrs for n in graph.nodes.values() if n.op in ("conv", "conv_transpose")]
    fx_convs = [n.attrs for n in build_graph(model).nodes.values() if n.op in ("conv", "conv_transpose")]
    assert convs == fx_convs
    assert [len(c.layers) for c in report.chains] == [len(c.layers) for c in reference.chains]
    assert [layer.name for layer in report.layers] == [layer.name for layer in reference.layers]
    for ours, theirs in zip(report.layers, reference.layers):
        assert math.isclose(ours.frobenius, theirs.frobenius, rel_tol=1e-6)
    assert [b.op for b in report.barriers] == [b.op for b in reference.barriers] == ["sigmoid"]
    assert report.summary.all_verified is True
    assert report.summary.gradient.log10_frobenius_bound == pytest.approx(
        reference.summary.gradient.log10_frobenius_bound
    )


def test_constants_and_padding() -> None:
    """Constant nodes become initializers; zero padding is homogeneous, non-zero padding is not."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "c1.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "c2.weight")
    nodes = [
        helper.make_node("Conv", ["x", "c1.weight"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Constant", [], ["pads"], value_ints=[0, 0, 1, 1, 0, 0, 1, 1]),
        helper.make_node("Constant", [], ["fill"], value_float=0.0),
        helper.make_node("Pad", ["r", "pads", "fill"], ["p"]),
        helper.make_node("Conv", ["p", "c2.weight"], ["b"]),
        helper.make_node("Constant", [], ["one"], value_float=1.0),
        helper.make_node("Pad", ["b", "pads", "one"], ["q"]),
        helper.make_node("Constant", [], ["shape"], value_ints=[2, -1]),
        helper.make_node("Reshape", ["q", "shape"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 6, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None])],
            [w1, w2],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.checker.check_model(model)
    graph = graph_from_onnx(model)
    ops = [n.op for n in graph.nodes.values()]
    assert ops == ["input", "conv", "relu", "pad", "conv", "add_const", "reshape", "output"]
    assert graph.nodes[next(n for n in graph.nodes if graph.nodes[n].op == "conv")].attrs["padding"] == [0, 0]
    report = analyze_graph(graph).report
    assert [len(c.layers) for c in report.chains] == [2]
    assert report.chains[0].verification == "verified"


def test_check_onnx_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX files go through `check` like any model: verified in onnxruntime, rules applied."""
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)  # stdout must be JSON only
    path = _mlp_onnx(tmp_path)
    result = runner.invoke(app, ["check", str(path), "--require-verified", "--min-coverage", "1", "--format", "json"])
    assert result.exit_code == 0, result.output
    import json

    document = json.loads(result.output)
    assert document["model"]["format"] == "onnx"
    assert {c["name"]: c["status"] for c in document["checks"]} == {
        "self-check": "pass",
        "findings": "pass",
        "min-coverage": "pass",
        "require-verified": "pass",
    }


def _padded_conv(path: Path, padding: int) -> Path:
    """A 400-byte ONNX file: one conv padded by `padding` on an 8x8 input."""
    weight = numpy_helper.from_array(np.random.default_rng(0).random((8, 1, 3, 3), dtype=np.float32), "w")
    side = 8 + 2 * padding - 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[padding] * 4), helper.make_node("Relu", ["y"], ["z"])],
        "padded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, side, side])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("flags", [[], ["--input-shape", "1,1,8,8"]], ids=["default-input", "given-input"])
def test_an_onnx_run_larger_than_memory_is_refused_before_it_runs(tmp_path: Path, flags: list[str]) -> None:
    """A conv padded by 20 000 asks for 95 GiB from 400 bytes. Before: with a given input,
    onnxruntime's own error lines, then ours; with the default input, a report saying "no example
    input". Control: the file is valid ONNX, and padding 1 audits."""
    path = _padded_conv(tmp_path / "bomb.onnx", 20_000)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    result = CliRunner().invoke(app, ["audit", str(path), *flags])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output
    assert "GiB of float64 values" in result.output and "--input-shape" in result.output
    honest = CliRunner().invoke(app, ["audit", str(_padded_conv(tmp_path / "honest.onnx", 1)), *flags])
    assert honest.exit_code == 0, honest.output


def test_a_model_that_does_not_run_on_its_default_input_says_so(tmp_path: Path) -> None:
    """Dynamic batch, then a reshape to a fixed size that the default batch of 1 cannot take: the
    notes used to say "no example input", which hid why nothing was run."""
    weight = numpy_helper.from_array(np.ones((6, 4), np.float32), "w")
    shape = numpy_helper.from_array(np.array([2, 6], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[weight, shape],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = audit(path)
    assert "does not run on its default input" in report.summary.gradient.measured_note
    assert "--input-shape" in report.summary.gradient.measured_note
    given = audit(path, (torch.randn(2, 6),))  # control: with a batch of 2 it runs (ONNX: no autograd)
    assert (
        "no autograd" in given.summary.gradient.measured_note
        and given.summary.verification_note == "checked in float32"
    )
