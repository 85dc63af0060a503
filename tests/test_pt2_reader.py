"""pt2_reader against torch.export.load: the same program from the same archive, or a refusal that
sends the archive to torch.export.load; and an audit that never imports torch._dynamo."""

from __future__ import annotations

import json
import math
import operator
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from conftest import example_model
from wssi_audit import audit
from wssi_audit.errors import InputError
from wssi_audit.frontends.torch_export import unlifted_module
from wssi_audit.loading import load_model
from wssi_audit.pt2_reader import DTYPES, LAYOUTS, MEMORY_FORMATS, Unsupported, read_program
from wssi_audit.safe_archive import scan_pt2
from wssi_audit.safe_graph import resolve_target


class Odd(nn.Module):
    """Tied weights, a non-persistent buffer, a lifted tensor constant, a multi-output op
    (max_pool2d_with_indices through return_indices) and keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(16, 16, bias=False)
        self.tied = nn.Linear(16, 16, bias=False)
        self.tied.weight = self.head.weight
        self.register_buffer("scale", torch.full((4, 1, 1), 0.5), persistent=False)
        self.register_buffer("shift", torch.linspace(-1, 1, 4).reshape(4, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, indices = nn.functional.max_pool2d(self.conv(x).relu() * self.scale + self.shift, 2, return_indices=True)
        flat = torch.flatten(y, start_dim=1)[:, :16]
        offset = torch.tensor([0.25])  # a constant created in forward: lifted as a tensor constant
        return self.tied(self.head(flat)).clamp(min=0.0) + offset, indices


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)  # a buffer written in place: the graph keeps the in-place op
        return self.linear(x).relu()


def _save(model: nn.Module, x: torch.Tensor, path: Path, **export_args) -> Path:
    torch.export.save(torch.export.export(model.eval(), (x,), strict=False, **export_args), str(path))
    return path


def _read(path: Path) -> torch.export.ExportedProgram:
    archive, _ = scan_pt2(path)
    return read_program(archive)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    cases = {name: example_model(name) for name in ("cnn", "resnet_bn", "transformer_block")}
    torch.manual_seed(0)
    cases["odd"] = (Odd(), torch.randn(2, 3, 4, 4))
    cases["mutation"] = (CountsCalls(), torch.randn(2, 4))
    return cases


def _same_value(a: object, b: object, names: dict[fx.Node, str]) -> bool:
    """Node arguments compared by the names of the nodes they refer to."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y, names) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k], names) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):  # NaN: the same value, though not ==
        return math.isnan(b)
    return type(a) is type(b) and a == b


def assert_same_program(ours: torch.export.ExportedProgram, theirs: torch.export.ExportedProgram) -> None:
    """Graph (names, ops, arguments, module stacks, value metadata), signature, tensors with their
    aliasing, constants, sample inputs and module call graph, as torch.export.load gives them."""
    our_nodes, their_nodes = list(ours.graph.nodes), list(theirs.graph.nodes)
    assert [(n.name, n.op, n.target) for n in our_nodes] == [(n.name, n.op, n.target) for n in their_nodes]
    for a, b in zip(our_nodes, their_nodes):
        assert _same_value(a.args, b.args, {}), (a.format_node(), b.format_node())
        assert _same_value(dict(a.kwargs), dict(b.kwargs), {}), (a.format_node(), b.format_node())
        assert a.meta.get("nn_module_stack") == b.meta.get("nn_module_stack"), a.name
        assert a.meta.get("stack_trace") == b.meta.get("stack_trace"), a.name
        values = torch.utils._pytree.tree_leaves(a.meta.get("val"))
        expected = torch.utils._pytree.tree_leaves(b.meta.get("val"))
        assert len(values) == len(expected), a.name
        for value, other in zip(values, expected):
            assert (value.shape, value.stride(), value.dtype, value.requires_grad) == (
                other.shape,
                other.stride(),
                other.dtype,
                other.requires_grad,
            ), a.name
    assert ours.graph_signature == theirs.graph_signature
    assert ours.state_dict.keys() == theirs.state_dict.keys()
    for key, value in theirs.state_dict.items():
        mine = ours.state_dict[key]
        assert type(mine) is type(value) and mine.requires_grad == value.requires_grad, key
        assert torch.equal(mine, value) and mine.stride() == value.stride(), key
    pointers = {k: v.data_ptr() for k, v in ours.state_dict.items()}
    their_pointers = {k: v.data_ptr() for k, v in theirs.state_dict.items()}
    for a in pointers:  # tied weights stay one tensor
        for b in pointers:
            assert (pointers[a] == pointers[b]) == (their_pointers[a] == their_pointers[b]), (a, b)
    assert ours.constants.keys() == theirs.constants.keys()
    assert all(torch.equal(ours.constants[k], v) for k, v in theirs.constants.items())
    assert torch.utils._pytree.tree_structure(ours.example_inputs) == torch.utils._pytree.tree_structure(
        theirs.example_inputs
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            torch.utils._pytree.tree_leaves(ours.example_inputs), torch.utils._pytree.tree_leaves(theirs.example_inputs)
        )
    )
    assert [e.fqn for e in ours.module_call_graph] == [e.fqn for e in theirs.module_call_graph]
    assert [e.signature for e in ours.module_call_graph] == [e.signature for e in theirs.module_call_graph]
    assert [v.dialect for v in ours.verifiers] == [v.dialect for v in theirs.verifiers]
    torch.export.ExportedProgram.validate(ours)  # torch's own verifier (the reader's skips one check)


@pytest.mark.parametrize("name", ["cnn", "resnet_bn", "transformer_block", "odd", "mutation"])
def test_reader_builds_what_torch_export_load_builds(tmp_path, name):
    model, x = _models()[name]
    path = _save(model, x, tmp_path / f"{name}.pt2")
    ours, theirs = _read(path), torch.export.load(str(path))
    assert_same_program(ours, theirs)
    with torch.no_grad():  # and it runs: the unlifted module gives torch's module's outputs
        for got, want in zip(
            torch.utils._pytree.tree_leaves(unlifted_module(ours)(x)),
            torch.utils._pytree.tree_leaves(theirs.module()(x)),
        ):
            assert torch.equal(got, want)


class NonFiniteFloats(nn.Module):
    """Float arguments torch writes as strings ("NaN", "Infinity", "-Infinity")."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4, eps=math.nan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x).clamp(min=-math.inf, max=math.inf)


def test_reader_reads_non_finite_floats_as_torch_does(tmp_path):
    """Found by a sweep: the reader passed "NaN" on as a string, and the self-check could not run."""
    path = _save(NonFiniteFloats(), torch.randn(2, 4), tmp_path / "floats.pt2")
    ours, theirs = _read(path), torch.export.load(str(path))
    assert_same_program(ours, theirs)
    floats = [a for n in ours.graph.nodes for a in n.args if isinstance(a, float)]
    assert any(math.isnan(a) for a in floats) and math.inf in floats and -math.inf in floats


def test_reader_on_a_real_torchvision_model(tmp_path):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model, x = models.densenet121(num_classes=10), torch.randn(1, 3, 32, 32)  # concats, pools, BN
    path = _save(model, x, tmp_path / "densenet121.pt2")
    assert_same_program(_read(path), torch.export.load(str(path)))


@pytest.mark.parametrize("name", ["resnet_bn", "odd", "mutation"])
def test_audit_reports_are_identical_through_either_loader(tmp_path, name):
    model, x = _models()[name]
    path = _save(model, x, tmp_path / f"{name}.pt2")
    fast = audit(load_model(path, for_analysis=True))
    plain = audit(load_model(path))
    fast_json, plain_json = json.loads(fast.to_json()), json.loads(plain.to_json())
    assert fast_json == plain_json
    assert fast_json["summary"]["gradient"]["log10_measured"] is not None


def test_a_plain_archive_is_audited_without_importing_dynamo_or_sympy(tmp_path):
    """The point of the reader (a second), of the window size rules, the reader's verifier and the
    measured gradient's seeds (0.4 s, sympy); the control shows the probe sees torch.export.load's
    imports of both."""
    model, x = example_model("resnet_bn")
    path = _save(model, x, tmp_path / "model.pt2")
    probe = (
        "import sys; from wssi_audit import audit; from wssi_audit.loading import load_model; "
        "report = audit(load_model(sys.argv[1], for_analysis=sys.argv[2] == 'fast')); "
        "assert report.summary.gradient.log10_measured is not None; "
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)"
    )
    for mode, expected in (("fast", "False False"), ("plain", "True True")):
        done = subprocess.run([sys.executable, "-c", probe, str(path), mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == expected, (mode, done.stdout)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["graph_module"]["signature"]["input_specs"].pop(0), "Number of graph inputs"),
        (lambda d: d.__setitem__("verifiers", ["ATEN"]), "not functional"),
    ],
    ids=["signature-short-of-an-input", "in-place-op-in-the-functional-dialect"],
)
def test_the_readers_verifier_refuses_what_torchs_refuses(tmp_path, edit, message):
    """The reader checks its program as torch's verifier does (but for the value check that imports
    sympy): a signature that misses a graph input, or an in-place op in a dialect that forbids them,
    is refused by both, and the audit says the file is unreadable."""
    model, x = _models()["mutation"]  # a buffer written in place (add_)
    path = _edited(_save(model, x, tmp_path / "model.pt2"), tmp_path / "edited.pt2", "models/model.json", edit)
    with pytest.raises(torch._export.verifier.SpecViolationError, match=message):
        _read(path)
    with pytest.raises(Exception, match=message):
        torch.export.load(str(path))
    with pytest.raises(InputError, match=r"cannot read torch\.export archive"):
        load_model(path, for_analysis=True)


class Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a higher-order op around the region
            y = self.linear(x)
        return y.float().relu()


def _dynamic(tmp_path: Path) -> Path:
    model, x = example_model("mlp")
    batch = torch.export.Dim("batch", min=2, max=64)
    x = torch.cat([x, x])
    return _save(model, x, tmp_path / "dynamic.pt2", dynamic_shapes=({0: batch},))


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda p: _save(Autocast(), torch.randn(2, 4), p / "autocast.pt2"), "operator"),
        (_dynamic, "symbolic"),
    ],
    ids=["higher-order-op", "dynamic-shapes"],
)
def test_what_the_reader_does_not_build_goes_to_torch_export_load(tmp_path, build, reason):
    path = build(tmp_path)
    with pytest.raises(Unsupported, match=reason):
        _read(path)
    loaded = load_model(path, for_analysis=True)  # read by torch.export.load instead
    program = loaded.model
    x = program.example_inputs[0][0]
    with torch.no_grad():  # the runner's own unlifting runs it as torch's module() does
        ours = torch.utils._pytree.tree_leaves(unlifted_module(program)(x))  # flat: the runner's view
        assert len(ours) == 1 and torch.equal(ours[0], program.module()(x))
    report = audit(loaded)
    assert report.model.parameters > 0
    assert json.loads(report.to_json()) == json.loads(audit(load_model(path)).to_json())


def _edited(source: Path, target: Path, member_suffix: str, edit) -> Path:
    with zipfile.ZipFile(source) as archive:
        items = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in items:
            if name.endswith(member_suffix):
                document = json.loads(data)
                edit(document)
                data = json.dumps(document).encode()
            archive.writestr(name, data)
    return target


def _grow_first_weight(document: dict) -> None:
    entry = next(iter(document["config"].values()))
    entry["tensor_meta"]["sizes"][0]["as_int"] *= 1000  # far past the payload's bytes


def _negative_stride(document: dict) -> None:
    entry = next(iter(document["config"].values()))
    entry["tensor_meta"]["strides"][0]["as_int"] = -1


@pytest.mark.parametrize("edit", [_grow_first_weight, _negative_stride], ids=["past-the-bytes", "negative-stride"])
def test_a_weight_that_reaches_outside_its_payload_is_refused(tmp_path, edit):
    """A crafted size must never make a view of memory beyond the payload (the reader checks; then
    torch.export.load refuses it as well, and the CLI says so in one line)."""
    model, x = example_model("cnn")
    path = _edited(_save(model, x, tmp_path / "cnn.pt2"), tmp_path / "crafted.pt2", "model_weights_config.json", edit)
    with pytest.raises(Unsupported, match=r"payload|sizes"):
        _read(path)
    from typer.testing import CliRunner

    from wssi_audit.cli import app

    result = CliRunner().invoke(app, ["audit", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_targets_resolve_as_torchs_deserializer_resolves_them(tmp_path):
    from torch._export.serde.serialize import GraphModuleDeserializer

    model, x = _models()["odd"]
    path = _save(model, x, tmp_path / "odd.pt2")
    with zipfile.ZipFile(path) as archive:
        document = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("models/model.json"))))
    names = {node["target"] for node in document["graph_module"]["graph"]["nodes"]}
    names |= {
        "torch.ops.aten.no_such_op.default",
        "torch.ops.aten.conv2d.no_such_overload",
        "torch.ops.no_such_namespace.op.default",
        "torch.ops.aten.from_file.default",
        "torch.ops.higher_order.wrap_with_autocast",
        "_operator.getitem",
        "math.trunc",
    }
    reference = GraphModuleDeserializer()
    for name in sorted(names):
        assert resolve_target(name) == reference.deserialize_operator(name), name
    assert resolve_target("_operator.getitem") is operator.getitem


def test_enum_tables_match_torchs():
    from torch._export.serde import serialize

    for code, dtype in DTYPES.items():
        assert serialize._SERIALIZE_TO_TORCH_DTYPE[code] is dtype
    for code, layout in LAYOUTS.items():
        assert serialize._SERIALIZE_TO_TORCH_LAYOUT[code] is layout
    for code, memory_format in MEMORY_FORMATS.items():
        assert serialize._SERIALIZE_TO_TORCH_MEMORY_FORMAT[code] is memory_format


ZOO = [
    ("torchvision", "mobilenet_v3_small", 64),  # hardswish, squeeze-excitation gates
    ("torchvision", "swin_t", 224),  # attention, roll, layer norm, GELU
    ("timm", "res2net50_14w_8s", 64),  # split / add / cat
    ("timm", "levit_128s", 224),  # attention, BatchNorm after linear layers
]


@pytest.mark.slow
@pytest.mark.parametrize("library, name, size", ZOO, ids=[f"{lib}-{name}" for lib, name, _ in ZOO])
def test_reader_on_real_architectures(tmp_path, library, name, size):
    """Beyond ReLU networks: the reader builds torch's program for transformers and gated nets too
    (measured once on 23 torchvision and timm classifiers, all identical; these four in CI)."""
    torch.manual_seed(0)
    if library == "torchvision":
        model = getattr(pytest.importorskip("torchvision.models"), name)(num_classes=10)
    else:
        model = pytest.importorskip("timm").create_model(name, pretrained=False, num_classes=10)
    path = _save(model, torch.randn(1, 3, size, size), tmp_path / f"{name}.pt2")
    assert_same_program(_read(path), torch.export.load(str(path)))
