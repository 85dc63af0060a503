"""Every way a crafted model file could run code, or pass corrupt, through every command that loads it.

Each attack starts from a real `torch.export.save` output (or torch.save / torch.jit.save / onnx.save)
and edits the file the way an attacker would. The payload creates a marker file; through the CLI the
command must exit 2 with one line and the marker must never exist. Each attack also has a control:
the same file handed to torch (or onnx) directly really does create the marker, or really does load
corrupt weights silently, so the refusal is what stops it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.export.pt2_archive import constants as pt2_constants
from typer.testing import CliRunner

from conftest import example_model
from wssi_audit.cli import app
from wssi_audit.models import INPUT_SHAPES

runner = CliRunner()
SHAPE = ",".join(map(str, INPUT_SHAPES["cnn"]))
ARCH = "wssi_audit.models:cnn"
Items = list[tuple[str, bytes]]


class CreatesFile:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def read_members(path: Path) -> Items:
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def write_members(path: Path, items: Items) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in items:
            archive.writestr(name, data)
    return path


def root_of(items: Items) -> str:
    return items[0][0].split("/", 1)[0] + "/"


def replace(items: Items, suffix: str, data: bytes) -> Items:
    assert any(name.endswith(suffix) for name, _ in items), suffix
    return [(name, data if name.endswith(suffix) else old) for name, old in items]


def edit_json(items: Items, suffix: str, edit: Callable[[dict], None]) -> Items:
    out = []
    for name, data in items:
        if name.endswith(suffix):
            document = json.loads(data)
            edit(document)
            data = json.dumps(document).encode()
        out.append((name, data))
    return out


def flip_byte(path: Path, member_suffix: str, target: Path) -> Path:
    """One byte of a member's data changed, its recorded CRC-32 left as it was."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 5] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


# --- .pt2 attacks ----------------------------------------------------------------------------------


@dataclass
class Attack:
    name: str
    build: Callable[[Items, Path, Path], Items]  # (members, marker, work folder) -> members
    message: str  # part of the one-line refusal
    control: str  # "load": torch.export.load runs it; "run": running the loaded module does


def _sample_inputs(items, marker, _):
    return replace(items, "data/sample_inputs/model.pt", torch_pickle(CreatesFile(marker)))


def _use_pickle_weight(items, marker, _):
    def flag(document):
        document["config"]["0.weight"]["use_pickle"] = True

    items = edit_json(items, "model_weights_config.json", flag)
    return replace(items, "data/weights/weight_0", torch_pickle(CreatesFile(marker)))


def _pickled_constant(items, marker, _):
    def add(document):
        document["config"]["c0"] = {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}

    items = edit_json(items, "model_constants_config.json", add)
    return [*items, (root_of(items) + "data/constants/tensor_0", torch_pickle(CreatesFile(marker)))]


def _opaque_constant(items, marker, _):
    import pickle

    def add(document):
        document["config"]["c0"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    items = edit_json(items, "model_constants_config.json", add)
    return [*items, (root_of(items) + "data/constants/opaque_obj_0", pickle.dumps(CreatesFile(marker)))]


def _legacy_weights(items, marker, _):
    return [*items, (root_of(items) + "data/weights/model.pt", torch_pickle(CreatesFile(marker)))]


def _second_model(items, marker, _):
    """A second program 'aaa' (loaded before 'model') whose legacy weight file is a pickle."""
    root, by_name = root_of(items), dict(items)
    extra = [
        (root + "models/aaa.json", by_name[root + "models/model.json"]),
        (root + "data/sample_inputs/aaa.pt", by_name[root + "data/sample_inputs/model.pt"]),
        (
            root + "data/constants/aaa_constants_config.json",
            by_name[root + "data/constants/model_constants_config.json"],
        ),
        (root + "data/weights/aaa.pt", torch_pickle(CreatesFile(marker))),
    ]
    return extra + items


def _guards_code(items, marker, _):
    def inject(document):
        document["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]

    return edit_json(items, "models/model.json", inject)


def _shape_expression(items, marker, _):
    def inject(document):
        values = document["graph_module"]["graph"]["tensor_values"]
        first = next(iter(values))
        values[first]["sizes"][0] = {"as_expr": {"expr_str": f"open({str(marker)!r}, 'w') and 2", "hint": None}}

    return edit_json(items, "models/model.json", inject)


def _from_file_operator(items, marker, _):
    """aten::from_file with shared=True creates (and maps) any file the graph names."""

    def inject(document):
        graph = document["graph_module"]["graph"]
        graph["nodes"].insert(
            0,
            {
                "target": "torch.ops.aten.from_file.default",
                "inputs": [
                    {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                    {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                    {"name": "size", "arg": {"as_int": 4}, "kind": 1},
                ],
                "outputs": [{"as_tensor": {"name": "evil"}}],
                "metadata": {},
                "name": "evil",
            },
        )
        graph["tensor_values"]["evil"] = {
            "dtype": 7,
            "sizes": [{"as_int": 4}],
            "requires_grad": False,
            "device": {"type": "cpu", "index": None},
            "strides": [{"as_int": 1}],
            "storage_offset": {"as_int": 0},
            "layout": 7,
        }

    return edit_json(items, "models/model.json", inject)


def _python_callable_target(items, marker, _):
    def inject(document):
        document["graph_module"]["graph"]["nodes"].insert(
            0,
            {
                "target": "torch.os.system",
                "inputs": [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
                "outputs": [{"as_none": True}],
                "metadata": {},
                "name": "evil",
            },
        )

    return edit_json(items, "models/model.json", inject)


def _enum_import(items, marker, work, blank=""):
    """An enum key in the input spec makes torch import a module: here one beside the model.
    `blank`: written before the context string (json.loads skips it)."""
    module = f"evil_{uuid.uuid4().hex[:8]}"
    (work / f"{module}.py").write_text(f"open({str(marker)!r}, 'w')\nimport enum\nclass E(enum.Enum):\n    A = 1\n")

    def inject(document):
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        kwargs = spec[1]["children_spec"][1]
        kwargs["context"] = blank + json.dumps([{"__enum__": True, "fqn": f"{module}:E", "name": "A"}])
        kwargs["children_spec"] = [{"type": None, "context": None, "children_spec": []}]
        signature["in_spec"] = json.dumps(spec)

    return edit_json(items, "models/model.json", inject)


def _renamed(items: Items, old: str, new: str) -> Items:
    """Value `old` renamed `new` wherever the graph and its signature name it."""

    def rename(document):
        text = json.dumps(document).replace(json.dumps({"name": old}), json.dumps({"name": new}))
        document.clear()
        document.update(json.loads(text))
        graph = document["graph_module"]["graph"]
        graph["tensor_values"][new] = graph["tensor_values"].pop(old)

    return edit_json(items, "models/model.json", rename)


def _placeholder_name(items, marker, _):
    """A value name is written into the generated forward's signature: a default argument runs
    when torch compiles it (GraphModule.recompile, inside torch.export.load)."""
    return _renamed(items, "input", f"input=open({str(marker)!r}, 'w')")


def _forward_arg_names(items, marker, _):
    """forward_arg_names become the unlifted module's signature (ExportedProgram.module())."""

    def inject(document):
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [f'input=open({str(marker)!r}, "w")):\n    """, (([0']

    return edit_json(items, "models/model.json", inject)


def _parameter_name(items, marker, _):
    """A qualified name is written into code as getattr(self, "..."): a quote ends the string.
    (No dot may appear in the payload: torch splits the name at dots; the path goes as bytes.)"""
    path = "bytes([" + ",".join(str(b) for b in str(marker).encode()) + "])"
    evil = f'0.x")if open({path},"w")else("'  # the condition runs first

    def in_signature(document):
        for spec in document["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == "0.weight":
                spec["parameter"]["parameter_name"] = evil

    def in_weights(document):
        document["config"][evil] = document["config"].pop("0.weight")

    items = edit_json(items, "models/model.json", in_signature)
    return edit_json(items, "model_weights_config.json", in_weights)


def _enum_behind_blank(items, marker, work):
    """The enum of `_enum_import`, its context string starting with a blank."""
    return _enum_import(items, marker, work, blank=" ")


def _unchecked_view(items, marker, _):
    """The first conv's bias read through aten._reshape_alias with stride 4096: sizes and strides
    are taken as given, no bounds check, so the conv reads memory past the bias's payload."""

    def inject(document):
        graph = document["graph_module"]["graph"]
        conv = next(n for n in graph["nodes"] if n["target"] == "torch.ops.aten.conv2d.default")
        bias = next(i for i in conv["inputs"] if i["name"] == "bias")
        source = bias["arg"]["as_tensor"]["name"]
        count = graph["tensor_values"][source]["sizes"][0]["as_int"]
        graph["nodes"].insert(0, {
            "target": "torch.ops.aten._reshape_alias.default",
            "inputs": [
                {"name": "self", "arg": {"as_tensor": {"name": source}}, "kind": 1},
                {"name": "size", "arg": {"as_ints": [count]}, "kind": 1},
                {"name": "stride", "arg": {"as_ints": [4096]}, "kind": 1},
            ],
            "outputs": [{"as_tensor": {"name": "evil"}}],
            "metadata": {},
            "name": "evil",
        })  # fmt: skip
        graph["tensor_values"]["evil"] = {**graph["tensor_values"][source], "strides": [{"as_int": 4096}]}
        bias["arg"] = {"as_tensor": {"name": "evil"}}

    return edit_json(items, "models/model.json", inject)


OPAQUE = hasattr(pt2_constants, "OPAQUE_OBJ_FILENAME_PREFIX")  # opaque objects: torch 2.13 and later
ATTACKS = [
    Attack("sample-inputs-pickle", _sample_inputs, "needs io.open", "load"),
    Attack("use-pickle-weight", _use_pickle_weight, "needs io.open", "load"),
    Attack("pickled-constant", _pickled_constant, "needs io.open", "load"),
    # torch < 2.13 has no opaque objects: the payload is then refused as any non-tensor pickle
    Attack("opaque-constant", _opaque_constant, "Python or TorchBind object" if OPAQUE else "weights_only", "load"),
    Attack("legacy-weights-member", _legacy_weights, "needs io.open", "load"),
    Attack("second-model", _second_model, "needs io.open", "load"),
    Attack("guards-code", _guards_code, "input guard", "run"),
    Attack("shape-expression", _shape_expression, "shape expression", "load"),
    Attack("from-file-operator", _from_file_operator, "opens files", "run"),
    Attack("enum-import", _enum_import, "imports module", "load"),
    Attack("enum-behind-a-blank", _enum_behind_blank, "imports module", "load"),
    Attack("placeholder-name", _placeholder_name, "is not a Python identifier", "load"),
    Attack("forward-arg-names", _forward_arg_names, "is not a Python identifier", "run"),
    Attack("parameter-name", _parameter_name, "is not a qualified name", "run"),
    Attack("unchecked-view", _unchecked_view, "without a bounds check", "memory"),
]


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """A real torch.export.save output of the demo CNN (digits-shaped input)."""
    model, x = example_model("cnn")
    path = tmp_path_factory.mktemp("honest") / "cnn.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return path


def craft(honest: Path, attack: Attack, work: Path) -> tuple[Path, Path]:
    marker = work / f"{attack.name}.marker"
    items = attack.build(read_members(honest), marker, work)
    return write_members(work / f"{attack.name}.pt2", items), marker


def tiny_data(folder: Path) -> Path:
    """64 digits-shaped examples: finetune's data, small enough for a one-epoch run in seconds."""
    path = folder / "tiny.npz"
    if not path.exists():
        generator = np.random.default_rng(0)
        np.savez(path, x=generator.random((64, 1, 8, 8), np.float32), y=np.arange(64) % 10)
    return path


def commands(model: Path, out: Path) -> dict[str, list[str]]:
    """Every command that loads a model, with its output inside `out`."""
    data = str(tiny_data(out))
    return {
        "audit": ["audit", str(model)],
        "check": ["check", str(model), "-f", "json"],
        "balance": ["balance", str(model), "-o", str(out / "balanced.pt2")],
        "export": ["export", str(model), "--onnx", str(out / "model.onnx")],
        "finetune": ["finetune", str(model), "--data", data, "--epochs", "1", "-o", str(out / "tuned.pt2")],
    }


COMMANDS = ["audit", "check", "balance", "export", "finetune"]


def assert_refused(result, message: str, command: str) -> None:
    """Exit 2, no traceback, the reason given: as one line on stderr, or (check) as the model's error."""
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    if command == "check":  # a model that cannot be loaded is an error entry of check's report
        assert message in json.loads(result.stdout)["error"], output
    else:
        assert output.strip().startswith("error:") and len(output.strip().splitlines()) == 1, output
        assert message in output, output


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_crafted_archive_is_refused_and_runs_nothing(honest, tmp_path, monkeypatch, attack, command):
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m wssi_audit` run from the model's folder
    path, marker = craft(honest, attack, tmp_path)
    result = runner.invoke(app, commands(path, tmp_path)[command])
    assert_refused(result, attack.message, command)
    assert not marker.exists()
    assert not any(tmp_path.glob("balanced*")) and not any(tmp_path.glob("model.onnx*"))


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_control_torch_itself_runs_the_crafted_archive(honest, tmp_path, monkeypatch, attack):
    """Without the scan the payload runs: torch.export.load (or the loaded module's first call)
    creates the marker. So the refusal above is what protects, not a broken file."""
    if attack.name == "opaque-constant" and not OPAQUE:
        pytest.skip("torch < 2.13 loads no opaque objects: nothing of this archive runs")
    if attack.control == "memory":
        _control_reads_outside(honest, attack, tmp_path)
        return
    monkeypatch.syspath_prepend(str(tmp_path))
    path, marker = craft(honest, attack, tmp_path)
    try:
        program = torch.export.load(str(path))
        if attack.control == "run":
            assert not marker.exists()
            args, kwargs = program.example_inputs
            program.module()(*args, **kwargs)
    except Exception:
        pass  # most crafted archives fail after the payload ran
    assert marker.exists()


def _control_reads_outside(honest: Path, attack: Attack, work: Path) -> None:
    """torch loads the archive and its module runs to the end (or dies of the read): no check of
    torch's stops it. In a child process, since the read may crash it."""
    path, _ = craft(honest, attack, work)
    code = (
        "import sys, torch; p = torch.export.load(sys.argv[1]); a, k = p.example_inputs; "
        "p.module()(*a, **k); print('ran')"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode < 0 or (done.returncode == 0 and "ran" in done.stdout), done.stderr[-2000:]


def test_payload_creates_its_marker_when_unpickled_plainly(tmp_path):
    import pickle

    marker = tmp_path / "plain.marker"
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()


def test_python_callable_target_is_refused_before_torch_sees_it(honest, tmp_path):
    """torch's verifier rejects a node calling torch.os.system only after deserializing the graph;
    the scan refuses it first (a newer torch may build such nodes without verifying)."""
    path, marker = craft(honest, Attack("callable", _python_callable_target, "", "run"), tmp_path)
    result = runner.invoke(app, ["audit", str(path)])
    assert_refused(result, "is not a tensor operator", "audit")
    assert not marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_honest_archive_loads_in_every_command_with_and_without_trust(honest, tmp_path, command):
    for flags in ([], ["--trust-pickle"]):
        out = tmp_path / ("trusted" if flags else "plain")
        out.mkdir()
        result = runner.invoke(app, [*commands(honest, out)[command], *flags])
        assert result.exit_code == 0, result.output


# --- corrupt or ambiguous archives -------------------------------------------------------------------


def test_control_torch_loads_a_crc_corrupt_weight_silently(honest, tmp_path):
    corrupt = flip_byte(honest, "data/weights/weight_2", tmp_path / "corrupt.pt2")
    original = torch.export.load(str(honest)).state_dict["2.weight"]
    loaded = torch.export.load(str(corrupt)).state_dict["2.weight"]
    assert not torch.equal(original, loaded)


def _truncated(honest: Path, target: Path) -> Path:
    target.write_bytes(honest.read_bytes()[: honest.stat().st_size // 2])
    return target


def _with_member(honest: Path, target: Path, name: str, data: bytes) -> Path:
    items = read_members(honest)
    return write_members(target, [*items, (root_of(items) + name, data)])


def _duplicate(honest: Path, target: Path) -> Path:
    items = read_members(honest)
    version = next(item for item in items if item[0].endswith("archive_version"))
    return write_members(target, [*items, version])


def _escaping_payload(honest: Path, target: Path) -> Path:
    def escape(document):
        document["config"]["0.weight"]["path_name"] = "../../models/model.json"

    return write_members(target, edit_json(read_members(honest), "model_weights_config.json", escape))


def _other_sample_input(honest: Path, target: Path) -> Path:
    """Sample inputs of another size than the program was traced with (still a weights-only pickle)."""
    items = read_members(honest)
    member = next(name for name, _ in items if name.endswith("data/sample_inputs/model.pt"))
    args, kwargs = torch.load(io.BytesIO(dict(items)[member]), weights_only=True)
    resized = (torch.randn(*args[0].shape[:-2], 5, 5), *args[1:])
    return write_members(target, replace(items, "data/sample_inputs/model.pt", torch_pickle((resized, kwargs))))


def _prefixed(honest: Path, target: Path) -> Path:
    """Bytes before the zip: Python's zipfile reads it (it finds the offset), torch's reader does not."""
    target.write_bytes(b"\0" * 64 + honest.read_bytes())
    with zipfile.ZipFile(target) as archive:
        assert archive.testzip() is None, "control: zipfile reads every member of the prefixed archive"
    return target


CORRUPTIONS = {
    "crc": (lambda h, t: flip_byte(h, "data/weights/weight_2", t), "CRC"),
    "truncated": (_truncated, "not a zip archive"),
    "native-code-member": (lambda h, t: _with_member(h, t, "data/aotinductor/model/x.so", b"\x7fELF"), "native code"),
    "unknown-member": (lambda h, t: _with_member(h, t, "data/notes.bin", b"hello"), "not part of"),
    "duplicate-member": (_duplicate, "duplicate"),
    "payload-path-escapes": (_escaping_payload, "points outside"),
    "unreadable-by-torch": (_prefixed, "not a readable"),
    "sample-input-of-another-size": (_other_sample_input, "the program was traced with"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_or_ambiguous_archive_is_an_input_error(honest, tmp_path, corruption, command):
    if corruption == "sample-input-of-another-size" and command == "finetune":
        pytest.skip("finetune trains on --data and never runs the sample inputs")
    build, message = CORRUPTIONS[corruption]
    path = build(honest, tmp_path / f"{corruption}.pt2")
    result = runner.invoke(app, commands(path, tmp_path)[command])
    assert_refused(result, message, command)


def test_a_crc_error_is_found_even_with_trust(honest, tmp_path):
    path = flip_byte(honest, "data/weights/weight_2", tmp_path / "corrupt.pt2")
    assert_refused(runner.invoke(app, ["audit", str(path), "--trust-pickle"]), "CRC", "audit")


def test_python_api_refuses_too(honest, tmp_path):
    import wssi_audit
    from wssi_audit.errors import InputError

    path, marker = craft(honest, ATTACKS[0], tmp_path)
    with pytest.raises(InputError, match="weights_only"):
        wssi_audit.audit(path)
    assert not marker.exists()


# --- checkpoints, TorchScript, ONNX ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_state():
    model, _ = example_model("cnn")
    return model.state_dict()


CHECKPOINT_COMMANDS = {
    "audit": lambda p, o: ["audit", str(p)],
    "check": lambda p, o: ["check", str(p), "-f", "json"],
    "balance": lambda p, o: ["balance", str(p), "-o", str(o / "balanced.pt")],
    "export": lambda p, o: ["export", str(p), "--onnx", str(o / "model.onnx")],
    "finetune": lambda p, o: [
        "finetune",
        str(p),
        "--data",
        str(tiny_data(o)),
        "--epochs",
        "1",
        "-o",
        str(o / "tuned.pt"),
    ],
}


def _checkpoint_attacks(state, marker):
    return {
        "pickled-object": CreatesFile(marker),
        "lightning-hyper-parameters": {"state_dict": state, "hyper_parameters": {"lr": CreatesFile(marker)}},
    }


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("attack", ["pickled-object", "lightning-hyper-parameters"])
def test_malicious_checkpoint_is_refused(cnn_state, tmp_path, attack, command):
    marker = tmp_path / "checkpoint.marker"
    path = tmp_path / "model.ckpt"
    torch.save(_checkpoint_attacks(cnn_state, marker)[attack], path)
    args = [*CHECKPOINT_COMMANDS[command](path, tmp_path), "--arch", ARCH]
    if command != "finetune":
        args += ["--input-shape", SHAPE]
    assert_refused(runner.invoke(app, args), "--trust-pickle", command)
    assert not marker.exists()


@pytest.mark.parametrize("attack", ["pickled-object", "lightning-hyper-parameters"])
def test_control_plain_torch_load_runs_the_checkpoint(cnn_state, tmp_path, attack):
    marker = tmp_path / "checkpoint.marker"
    path = tmp_path / "model.ckpt"
    torch.save(_checkpoint_attacks(cnn_state, marker)[attack], path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_crc_corrupt_state_dict_is_refused_and_torch_would_load_it(cnn_state, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(cnn_state, path)
    corrupt = flip_byte(path, "data/2", tmp_path / "corrupt.pt")
    assert not torch.equal(torch.load(corrupt, weights_only=True)["2.weight"], cnn_state["2.weight"])  # control
    result = runner.invoke(app, ["audit", str(corrupt), "--arch", ARCH, "--input-shape", SHAPE])
    assert_refused(result, "CRC", "audit")


class SetstateWritesFile(torch.nn.Module):
    """TorchScript runs __setstate__ inside torch.jit.load; this one creates a file with from_file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.w = torch.nn.Parameter(torch.ones(64, 10))

    def forward(self, x):
        return x.flatten(1) @ self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str]:
        return (self.w, self.marker)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str]) -> None:
        mapped = torch.from_file(state[1], True, 4)
        self.w = state[0] + mapped.sum() * 0.0
        self.marker = state[1]
        self.training = False


def test_torchscript_setstate_is_refused_and_torch_would_run_it(tmp_path):
    marker = tmp_path / "torchscript.marker"
    path = tmp_path / "scripted.pt"
    torch.jit.script(SetstateWritesFile(str(marker))).save(str(path))
    for command in COMMANDS[:4]:
        args = [*CHECKPOINT_COMMANDS[command](path, tmp_path), "--input-shape", SHAPE]
        assert_refused(runner.invoke(app, args), "__setstate__", command)
    assert not marker.exists()
    torch.jit.load(str(path))  # control
    assert marker.exists()


class SumsWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(64))

    def forward(self, x):
        return x.flatten(1) * torch.sum(torch.detach(self.w))


@pytest.mark.parametrize(
    "view", ["ops.aten._reshape_alias(w, [64], [4096])", "torch._reshape_alias_copy(w, [64], [4096])"]
)
def test_torchscript_reading_outside_a_weight_is_refused_and_torch_would_run_it(tmp_path, view):
    """TorchScript code may call any operator by name, also the views that take sizes and strides
    without a bounds check: this one sums 64 floats 16 KiB apart, from a 256-byte weight."""
    honest = tmp_path / "honest.pt"
    torch.jit.script(SumsWeight()).save(str(honest))
    items = [(n, d) for n, d in read_members(honest) if not n.endswith(".debug_pkl")]  # source ranges
    assert any(b"torch.detach(w)" in d for n, d in items if "/code/" in n and n.endswith(".py"))
    path = write_members(tmp_path / "reads.pt", [(n, d.replace(b"torch.detach(w)", view.encode())) for n, d in items])
    for command in COMMANDS[:4]:
        args = [*CHECKPOINT_COMMANDS[command](path, tmp_path), "--input-shape", SHAPE]
        assert_refused(runner.invoke(app, args), "without a bounds check", command)
    code = "import sys, torch; torch.jit.load(sys.argv[1])(torch.zeros(1, 64)); print('ran')"  # control
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode < 0 or (done.returncode == 0 and "ran" in done.stdout), done.stderr[-2000:]


def _onnx_with_external_weight(folder: Path, location: str) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save
    from onnx.external_data_helper import set_external_data

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    set_external_data(weight, location=location, offset=0, length=64)
    weight.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = folder / f"model_{uuid.uuid4().hex[:6]}.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def onnx_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.full(16, 7, np.float32).tobytes())
    (folder / "weights.bin").write_bytes(np.ones(16, np.float32).tobytes())
    os.symlink(tmp_path / "secret.bin", folder / "link.bin")
    return folder


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../secret.bin", "outside the model's folder"),
        ("ABSOLUTE", "outside the model's folder"),
        ("link.bin", "a link out of the model's folder"),
        ("missing.bin", "which is missing"),
    ],
)
@pytest.mark.parametrize("command", ["audit", "check", "balance"])
def test_onnx_external_data_must_stay_in_the_models_folder(onnx_folder, location, message, command):
    if location == "ABSOLUTE":
        location = str(onnx_folder.parent / "secret.bin")
    path = _onnx_with_external_weight(onnx_folder, location)
    args = {"audit": ["audit", str(path)], "check": ["check", str(path), "-f", "json"]}
    args["balance"] = ["balance", str(path), "-o", str(onnx_folder / "balanced.onnx")]
    assert_refused(runner.invoke(app, args[command]), message, command)
    assert not (onnx_folder / "balanced.onnx").exists()


def test_control_onnx_external_data_inside_the_folder_loads(onnx_folder):
    path = _onnx_with_external_weight(onnx_folder, "weights.bin")
    result = runner.invoke(app, ["audit", str(path), "-f", "json"])
    assert result.exit_code == 0, result.output
    assert (onnx_folder / "link.bin").read_bytes() == (onnx_folder.parent / "secret.bin").read_bytes()


def test_guards_may_call_pure_builtins_but_nothing_else() -> None:
    """torch 2.9 writes max(1, size // 2) into a converted TorchScript model's guards."""
    from wssi_audit.errors import InputError
    from wssi_audit.safe_graph import check_guard

    check_guard("max(1, L['input_3'].size()[2] // 2)*max(1, L['input_3'].size()[3] // 2) > 1")
    for hostile in ("__import__('os').system('x')", "max.__self__", "getattr(L, 'x')", "max(1, key=print)"):
        with pytest.raises(InputError):
            check_guard(hostile)


class ScaledInput(torch.nn.Module):
    """A forward with a keyword argument: the input spec's kwargs keys name it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return self.conv(x * scale).relu()


def _keyword_key_archive(tmp_path: Path, key: str) -> Path:
    honest = tmp_path / "kwargs.pt2"
    torch.export.save(torch.export.export(ScaledInput(), (torch.randn(1, 1, 6, 6),), {"scale": torch.ones(1)}), honest)

    def inject(document):
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        assert json.loads(spec[1]["children_spec"][1]["context"]) == ["scale"], "control: the kwargs spec as assumed"
        spec[1]["children_spec"][1]["context"] = json.dumps([key])
        signature["in_spec"] = json.dumps(spec)

    return write_members(tmp_path / "crafted.pt2", edit_json(read_members(honest), "models/model.json", inject))


def test_a_keyword_argument_key_written_into_code_is_refused(tmp_path):
    """torch writes the kwargs keys into the unlifted forward as {'key': value}: a quote in a key
    ends the string. Refused by audit and check; torch's generated forward runs it (a call through
    the module's __call__ first compares the keys with the spec's, which fails on this key)."""
    marker = tmp_path / "kwargs.marker"
    key = f"""scale':open("{marker}","w"),'z"""
    path = _keyword_key_archive(tmp_path, key)
    for command in ("audit", "check"):
        result = runner.invoke(app, [*commands(path, tmp_path)[command], "--input-shape", "1,1,6,6"])
        assert_refused(result, "is not a Python identifier", command)
        assert not marker.exists()
    program = torch.export.load(str(path))
    args, kwargs = program.example_inputs
    with contextlib.suppress(Exception):  # the generated forward's first line runs it
        program.module().forward(*args, kwargs["scale"])
    assert marker.exists(), "control: without the scan, torch runs the key"


def _deeply_nested(items: Items, _: Path) -> Items:
    """A JSON array nested 100 000 deep: json.loads gives up with a RecursionError."""

    def nest(document):
        document["graph_module"]["graph"]["nodes"][0]["metadata"]["stack_trace"] = "x"

    items = edit_json(items, "models/model.json", nest)
    deep = b"[" * 100_000 + b"]" * 100_000
    return [(n, d.replace(b'"stack_trace": "x"', b'"stack_trace": ' + deep) if n.endswith("model.json") else d)
            for n, d in items]  # fmt: skip


def _sample_inputs_not_a_pair(items: Items, _: Path) -> Items:
    return replace(items, "data/sample_inputs/model.pt", torch_pickle({"a": 1}))


def _stride_zero(items: Items, _: Path) -> Items:
    def zero(document):
        conv = next(n for n in document["graph_module"]["graph"]["nodes"] if "conv2d" in n["target"])
        stride = next(i for i in conv["inputs"] if i["name"] == "stride")
        stride["arg"] = {"as_ints": [0, 0]}

    return edit_json(items, "models/model.json", zero)


@pytest.mark.parametrize("command", ["audit", "check"])
@pytest.mark.parametrize(
    "build, message",
    [(_deeply_nested, "not valid JSON"), (_sample_inputs_not_a_pair, "not an (args, kwargs) pair"),
     (_stride_zero, "tensor<16>, [0, 0], [1, 1]) fails")],
    ids=["deeply-nested-json", "sample-inputs-not-a-pair", "conv-stride-zero"],
)  # fmt: skip
def test_malformed_archive_is_one_line_not_an_internal_error(honest, tmp_path, build, message, command):
    """Found by a hostile-input sweep: each of these was exit 4 (an internal error)."""
    path = write_members(tmp_path / "malformed.pt2", build(read_members(honest), tmp_path))
    assert_refused(runner.invoke(app, commands(path, tmp_path)[command]), message, command)


# --- archives that disagree with themselves or ask for more memory than there is ------------------
# None of these runs code; each would give wrong numbers or exhaust the machine. Controls: torch's
# own loader accepts each file without a word.


def _huge_padding(_: Path, work: Path) -> Path:
    """An honest export of a conv padded by 20 000: a 1x1x8x8 input makes 8 x 40006^2 outputs
    (95 GiB in float64), from a file of a few kilobytes. Exporting allocates nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=20_000), torch.nn.ReLU())
    path = work / "padded.pt2"
    torch.export.save(torch.export.export(model.eval(), (torch.randn(1, 1, 8, 8),)), str(path))
    return path


def _edit_weight_meta(key: str, value) -> Callable[[Path, Path], Path]:
    def build(honest: Path, work: Path) -> Path:
        def edit(document):
            document["config"]["0.weight"]["tensor_meta"][key] = value

        items = edit_json(read_members(honest), "model_weights_config.json", edit)
        return write_members(work / f"weight-{key}.pt2", items)

    return build


def _emptied_payload(honest: Path, work: Path) -> Path:
    return write_members(work / "emptied.pt2", replace(read_members(honest), "data/weights/weight_0", b""))


def _recorded_size(honest: Path, work: Path) -> Path:
    def shrink(document):
        document["graph_module"]["graph"]["tensor_values"]["conv2d"]["sizes"][-1] = {"as_int": 3}

    return write_members(work / "recorded.pt2", edit_json(read_members(honest), "models/model.json", shrink))


def _control_padding(program) -> None:
    conv = next(n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    assert math.prod(conv.meta["val"].shape) == 8 * 40_006**2


def _control_zero_stride(program) -> None:
    weight = program.state_dict["0.weight"]
    assert weight.stride() == (0, 0, 0, 0) and bool((weight == weight.flatten()[0]).all())


def _control_meta(program) -> None:
    assert program.state_dict["0.weight"].device.type == "meta"


def _control_emptied(program) -> None:
    assert not program.state_dict["0.weight"].any()  # read as zeros


def _control_recorded(program) -> None:
    assert next(n for n in program.graph.nodes if n.name == "conv2d").meta["val"].shape[-1] == 3


SELF_CONTRADICTIONS = [
    ("huge-padding", _huge_padding, "GiB of float64 values", _control_padding),
    ("weight-zero-stride", _edit_weight_meta("strides", [{"as_int": 0}] * 4), "is stored as", _control_zero_stride),
    ("weight-on-meta", _edit_weight_meta("device", {"type": "meta", "index": None}), "meta device", _control_meta),
    ("emptied-payload", _emptied_payload, "torch would read zeros", _control_emptied),
    ("recorded-size", _recorded_size, "is recorded as", _control_recorded),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, build, message, _", SELF_CONTRADICTIONS, ids=[c[0] for c in SELF_CONTRADICTIONS])
def test_an_archive_that_contradicts_itself_is_refused(honest, tmp_path, name, build, message, _, command):
    """Found by the hostile-input sweep: each was a normal-looking report, an internal error, or a
    run that allocated until the process was killed."""
    path = build(honest, tmp_path)
    assert_refused(runner.invoke(app, commands(path, tmp_path)[command]), message, command)


@pytest.mark.parametrize("name, build, _, control", SELF_CONTRADICTIONS, ids=[c[0] for c in SELF_CONTRADICTIONS])
def test_control_torch_loads_the_contradicting_archive(honest, tmp_path, name, build, _, control):
    control(torch.export.load(str(build(honest, tmp_path))))
