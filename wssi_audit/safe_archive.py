"""Is this archive safe to hand to torch?

torch.export.load runs code from a crafted .pt2 in several ways (torch 2.14 sources,
torch/export/pt2_archive/_package.py and torch/_export/serde/serialize.py; each one is an attack
in tests/test_attacks.py with a control that shows it really runs):

- it unpickles sample inputs, legacy weight/constant files and every payload flagged
  `use_pickle`, trying `weights_only=True` and falling back to `weights_only=False`;
- it unpickles opaque constants with `pickle.loads` and TorchBind objects with their own loader;
- it loads AOTInductor shared libraries found under data/aotinductor/;
- it loads every model under models/, not only "model";
- it evaluates shape expressions, compiles input guards and imports the modules that enum keys in
  the input specification name (safe_graph.py covers the first two; the imports are refused here).

So before torch sees an archive, this module reads it once into memory, checks every member's
CRC-32, requires torch's own zip reader to see the same members with the same bytes, accounts
for every member (a text field, a raw tensor payload, JSON that is checked, or a pickle), and runs
every pickle through torch's weights_only unpickler (torch._weights_only_unpickler: its allow-list
of tensor rebuild functions, dtypes, OrderedDict, ...). Only then does torch get the same bytes,
from memory, with weights_only forced on for every unpickling it does itself. With
`trust=True` only the integrity checks run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, describe, shorten
from .safe_graph import (
    TRUST_HINT,
    UNCHECKED_VIEWS,
    UnsafeContent,
    check_guard,
    check_qualified_name,
    check_shape_expression,
    check_target_name,
    check_value_name,
    file_operator_names,
)

# A payload's file name inside data/weights/ or data/constants/ (torch writes weight_0, tensor_0, ...).
PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Modules a pytree context may import to rebuild a defaultdict's factory.
FACTORY_MODULES = frozenset({"builtins", "collections"})


# Members are read into memory to be checked: their declared sizes may not exceed this share of it
# (a few kilobytes of deflated zeros can declare gigabytes).
MEMORY_FRACTION = 0.5


def physical_memory() -> int:
    """Bytes of RAM (POSIX); 8 GiB where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def check_run_fits(held: float, what: str, remedy: str, memory: int | None = None) -> None:
    """Refuse a run whose float64 values would hold more than MEMORY_FRACTION of `memory` (default:
    this machine's): a crafted padding of thousands asks for gigabytes from a few kilobytes."""
    limit = (memory or physical_memory()) * MEMORY_FRACTION
    if held > limit:
        raise InputError(
            f"one run of {what} holds {_bytes_text(held)} of float64 values, more than "
            f"{MEMORY_FRACTION:.0%} of this machine's {_bytes_text(limit / MEMORY_FRACTION)} of memory: {remedy}"
        )


def _bytes_text(count: float) -> str:
    """160 B, 3.2 MiB, 95.4 GiB."""
    power = min(int(math.log(count, 1024)), 3) if count >= 1 else 0
    unit = ("B", "KiB", "MiB", "GiB")[power]
    return f"{count:.0f} B" if power == 0 else f"{count / 1024**power:.1f} {unit}"


class CorruptArchive(InputError):
    """A member fails its CRC, the zip structure is damaged or ambiguous (exit 2)."""


@dataclass(frozen=True)
class VerifiedZip:
    """A torch zip archive read once into memory, every member's CRC-32 checked."""

    path: Path
    data: bytes
    root: str  # the archive's top folder, with its slash ("cnn/")
    names: tuple[str, ...]  # member names below `root`
    contents: Mapping[str, bytes]  # member name below `root` -> its checked bytes

    def read(self, name: str) -> bytes:
        return self.contents[name]

    def buffer(self) -> io.BytesIO:
        """What torch reads: these bytes, not the file again (it may have changed since)."""
        return io.BytesIO(self.data)


def read_verified_zip(path: Path, kind: str) -> VerifiedZip:
    """Every member's CRC checked, names unique and below one folder, and torch's own reader
    (PyTorchFileReader, which checks no CRC) seeing exactly the same members and bytes."""
    data = path.read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            _check_names(path, kind, names)
            declared = sum(info.file_size for info in infos)
            if declared > MEMORY_FRACTION * physical_memory():
                raise InputError(
                    f"{path.name}: its members declare {declared / 2**30:.3g} GiB, more than "
                    f"{MEMORY_FRACTION:.0%} of this machine's memory; not read"
                )
            contents = {}
            for info in infos:
                if info.flag_bits & 0x1:
                    raise CorruptArchive(f"{path.name}: member {info.filename} is encrypted")
                contents[info.filename] = archive.read(info)  # raises on a bad CRC-32
    except InputError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as error:
        raise CorruptArchive(shorten(f"{path.name} is a corrupt {kind}: {describe(error)}")) from None
    root = names[0].split("/", 1)[0] + "/"
    below = tuple(name[len(root) :] for name in names)
    _check_torch_reader(path, kind, data, root, below, contents)
    return VerifiedZip(path, data, root, below, {name[len(root) :]: contents[name] for name in names})


def _check_names(path: Path, kind: str, names: list[str]) -> None:
    if not names:
        raise CorruptArchive(f"{path.name} is an empty zip archive, not a {kind}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CorruptArchive(shorten(f"{path.name} has duplicate members ({', '.join(duplicates)}): ambiguous"))
    root = names[0].split("/", 1)[0] + "/"
    for name in names:
        parts = name.split("/")
        if not name.startswith(root) or name.startswith("/") or "\\" in name or ".." in parts or "" in parts[:-1]:
            raise CorruptArchive(shorten(f"{path.name} has a member outside its top folder: {name}"))


def _check_torch_reader(
    path: Path, kind: str, data: bytes, root: str, names: tuple[str, ...], contents: dict[str, bytes]
) -> None:
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = set(reader.get_all_records())
    except Exception as error:
        raise CorruptArchive(shorten(f"{path.name} is not a readable {kind}: {describe(error)}")) from None
    if records != set(names):
        extra = sorted(records.symmetric_difference(names))
        raise CorruptArchive(shorten(f"{path.name}: torch's reader sees other members ({', '.join(extra)})"))
    for name in names:
        if reader.get_record(name) != contents[root + name]:
            raise CorruptArchive(f"{path.name}: torch's reader sees other bytes for member {name}")


def scan_pickle(archive: VerifiedZip, name: str, data: bytes | None = None) -> None:
    """Unpickle with torch's weights_only unpickler only: anything outside its allow-list is refused."""
    data = archive.read(name) if data is None else data
    try:
        with warnings.catch_warnings():  # torch 2.9-2.12 warn about the pickle protocol on stderr
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeContent(
            shorten(
                f"{archive.path.name}: member {name} holds a pickle that {pickle_global(error)}, outside torch's "
                f"weights_only allow-list; it was not unpickled. {TRUST_HINT}"
            )
        ) from None
    except Exception as error:
        raise UnsafeContent(
            shorten(
                f"{archive.path.name}: member {name} is not a plain tensor pickle ({describe(error)}). {TRUST_HINT}"
            )
        ) from None


def pickle_global(error: BaseException) -> str:
    """'needs builtins.open' from torch's weights_only error message."""
    text = str(error)
    for marker in ("GLOBAL ", "global "):
        if marker in text:
            name = text.split(marker, 1)[1].split()[0].strip("'\"`.,")
            return f"needs {name}"
    return "uses something beyond tensors"


# --- torch.export archives ------------------------------------------------------------------------


def _pt2_layout() -> dict[str, Any]:
    from torch._C._export import pt2_archive_constants as c  # torch.export.pt2_archive would import torch._dynamo

    return {
        "fixed": {
            c.ARCHIVE_FORMAT_PATH,
            c.ARCHIVE_VERSION_PATH,
            "byteorder",
            ".data/version",
            ".data/serialization_id",
        },
        "format": (c.ARCHIVE_FORMAT_PATH, c.ARCHIVE_FORMAT_VALUE),
        "version": (c.ARCHIVE_VERSION_PATH, c.ARCHIVE_VERSION_VALUE),
        "models": c.MODELS_FILENAME_FORMAT,
        "sample_inputs": c.SAMPLE_INPUTS_FILENAME_FORMAT,
        "weights_dir": c.WEIGHTS_DIR,
        "constants_dir": c.CONSTANTS_DIR,
        "weights_config": c.WEIGHTS_CONFIG_FILENAME_FORMAT,
        "constants_config": c.CONSTANTS_CONFIG_FILENAME_FORMAT,
        "tensor_prefix": c.TENSOR_CONSTANT_FILENAME_PREFIX,
        # opaque objects are new in torch 2.13: older releases write no such member
        "code_prefixes": tuple(
            p for p in (c.CUSTOM_OBJ_FILENAME_PREFIX, getattr(c, "OPAQUE_OBJ_FILENAME_PREFIX", None)) if p
        ),
        "extra_dir": c.EXTRA_DIR,
        "code_dirs": (c.AOTINDUCTOR_DIR,),
    }


@dataclass
class Pt2Scan:
    """What the scan accounted for: figures for the report and the tests."""

    members: int = 0
    pickles: int = 0  # members run through the weights_only unpickler
    raw_payloads: int = 0  # tensor bytes torch maps without unpickling
    models: int = 0


def scan_pt2(path: Path, trust: bool = False) -> tuple[VerifiedZip, Pt2Scan]:
    """The archive verified (always) and, unless trusted, every member accounted for and safe."""
    archive = read_verified_zip(path, "torch.export archive")
    scan = Pt2Scan(members=len(archive.names))
    if trust:
        return archive, scan
    layout = _pt2_layout()
    names = set(archive.names)
    for key in ("format", "version"):
        member, expected = layout[key]
        if member not in names:
            raise InputError(f"{path.name} is not a torch.export archive of the current format (no {member})")
        if archive.read(member).decode(errors="replace").strip() != expected:
            raise InputError(f"{path.name}: {member} is not '{expected}' (saved by an incompatible torch)")
    accounted: set[str] = set(layout["fixed"]) & names
    accounted |= {n for n in names if n.startswith(layout["extra_dir"])}  # read as text
    prefix, suffix = layout["models"].split("{}")
    models = [n[len(prefix) : -len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)]
    if not models:
        raise InputError(f"{path.name} holds no exported program ({layout['models'].format('NAME')})")
    for model in sorted(models):
        scan.models += 1
        member = layout["models"].format(model)
        document = _read_json(archive, member)
        try:
            check_program_json(document, member)
        except InputError as error:  # UnsafeContent too: the same class, with the file named
            raise type(error)(shorten(f"{path.name}: {error}")) from None
        accounted.add(member)
        for pickled in (
            layout["sample_inputs"].format(model),
            f"{layout['weights_dir']}{model}.pt",  # legacy weight and constant files: torch prefers them
            f"{layout['constants_dir']}{model}.pt",
        ):
            if pickled in names:
                scan_pickle(archive, pickled)
                scan.pickles += 1
                accounted.add(pickled)
        for config_key, directory in (("weights_config", "weights_dir"), ("constants_config", "constants_dir")):
            config = layout[config_key].format(model)
            if config in names:
                accounted.add(config)
                accounted |= _scan_payloads(archive, config, layout[directory], layout, scan)
    unexpected = sorted(names - accounted)
    if unexpected:
        first = unexpected[0]
        reason = (
            "holds compiled native code that torch would load"
            if first.startswith(layout["code_dirs"])
            else "is not part of a torch.export program"
        )
        raise UnsafeContent(shorten(f"{path.name}: member {first} {reason}. {TRUST_HINT}"))
    return archive, scan


def _read_json(archive: VerifiedZip, member: str) -> Any:
    try:
        return json.loads(archive.read(member))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # nested too deep: RecursionError
        raise InputError(
            shorten(f"{archive.path.name}: member {member} is not valid JSON ({describe(error)})")
        ) from None


def _scan_payloads(
    archive: VerifiedZip, config: str, directory: str, layout: dict[str, Any], scan: Pt2Scan
) -> set[str]:
    """Members a payload config refers to: raw tensor bytes, or pickles (scanned)."""
    document = _read_json(archive, config)
    entries = document.get("config") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise InputError(f"{archive.path.name}: {config} has no 'config' table")
    names = set(archive.names)
    referenced: set[str] = set()
    pickled: set[str] = set()
    for fqn, entry in entries.items():
        check_qualified_name(fqn, f"{archive.path.name}: {config} entry")
        file_name = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(file_name, str) or not PAYLOAD_NAME.fullmatch(file_name):
            raise UnsafeContent(shorten(f"{archive.path.name}: {config} entry {fqn} points outside {directory}"))
        member = directory + file_name
        if member not in names:
            raise InputError(shorten(f"{archive.path.name}: {config} entry {fqn} names missing member {member}"))
        if file_name.startswith(layout["code_prefixes"]):
            raise UnsafeContent(
                shorten(f"{archive.path.name}: constant {fqn} is a Python or TorchBind object ({member}). {TRUST_HINT}")
            )
        referenced.add(member)
        if entry.get("use_pickle") is not False:
            pickled.add(member)
        elif not archive.read(member) and _element_count(entry.get("tensor_meta")):
            raise InputError(
                shorten(
                    f"{archive.path.name}: {config} entry {fqn} has no bytes in {member} (torch would read zeros): "
                    "the program was saved with fake weights, or the archive is corrupt"
                )
            )
    for member in sorted(pickled):
        scan_pickle(archive, member)
        scan.pickles += 1
    scan.raw_payloads += len(referenced - pickled)
    return referenced


def _element_count(tensor_meta: Any) -> int:
    """Elements of a payload's tensor by its recorded sizes (1 where they cannot be read: then an
    empty payload is refused too, and torch.export.load says what else is wrong)."""
    sizes = tensor_meta.get("sizes") if isinstance(tensor_meta, dict) else None
    if not isinstance(sizes, list):
        return 1
    counts = [size.get("as_int") if isinstance(size, dict) else None for size in sizes]
    return math.prod(n if type(n) is int else 1 for n in counts)


# Keys of models/<name>.json whose strings torch writes into generated code (safe_graph): value
# names, maps keyed by value names, qualified names of parameters, buffers, constants and modules.
VALUE_NAME_KEYS = frozenset({"name", "as_name", "user_input_name"})
VALUE_MAPS = frozenset({"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"})
QUALIFIED_NAME_KEYS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"})


def check_program_json(document: Any, where: str) -> None:
    """The parts of models/<name>.json that torch evaluates, compiles, resolves, imports or writes
    into code it runs."""
    stack: list[Any] = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        if isinstance(value.get("target"), str) and "inputs" in value:
            check_target_name(value["target"])
        for key, item in value.items():
            if key in VALUE_NAME_KEYS and isinstance(item, str) and "arg" not in value:
                # (an argument entry's name is only looked up in the operator's schema)
                check_value_name(item, f"{where}: value name")
            elif key in QUALIFIED_NAME_KEYS and isinstance(item, str):
                check_qualified_name(item, f"{where}: {key.replace('_', ' ')}")
            elif key == "forward_arg_names" and isinstance(item, list):
                for name in item:
                    check_value_name(name, f"{where}: forward argument name")
            elif key in VALUE_MAPS and isinstance(item, dict):
                for name in item:
                    check_value_name(name, f"{where}: value name")
                stack.extend(item.values())
            elif key == "as_operator" and isinstance(item, str):
                check_target_name(item)
            elif key == "expr_str":  # sympify also evaluates the strings inside a list
                if not isinstance(item, str):
                    raise UnsafeContent(f"{where}: a shape expression is a {type(item).__name__}, not text")
                check_shape_expression(item)
            elif key == "guards_code":
                if not isinstance(item, list) or not all(isinstance(guard, str) for guard in item):
                    raise UnsafeContent(f"{where}: guards_code is not a list of text")
                for guard in item:
                    check_guard(guard)
            elif key in ("in_spec", "out_spec") and isinstance(item, str):
                _check_treespec(item, where)
            else:
                stack.append(item)


def _check_treespec(text: str, where: str) -> None:
    """pytree specs: contexts are JSON that may name an enum or a factory to import, and the keys
    of the forward's keyword arguments, which torch writes into code it runs."""
    try:
        spec = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise InputError(f"{where}: an input or output specification is not valid JSON") from None
    stack: list[Any] = [spec]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            if "__enum__" in value:
                raise UnsafeContent(
                    shorten(f"{where}: an input specification imports module '{value.get('fqn')}'. {TRUST_HINT}")
                )
            factory = value.get("default_factory_module")
            if factory is not None and factory not in FACTORY_MODULES:
                raise UnsafeContent(
                    shorten(f"{where}: an input specification imports module '{factory}'. {TRUST_HINT}")
                )
            stack.extend(value.values())
        elif isinstance(value, str):  # any string torch may decode as JSON (leading blanks included)
            with contextlib.suppress(json.JSONDecodeError, RecursionError):
                decoded = json.loads(value)
                if isinstance(decoded, (list, dict)):
                    stack.append(decoded)
    for key in _keyword_argument_keys(spec):
        check_value_name(key, f"{where}: keyword argument")


def _keyword_argument_keys(spec: Any) -> list[Any]:
    """The keys of the (args, kwargs) input spec's kwargs dict: [version, {type: tuple, children_spec:
    [args spec, {type: builtins.dict, context: JSON list of keys}]}]; none for any other shape."""
    node = spec[1] if isinstance(spec, list) and len(spec) == 2 else None
    children = node.get("children_spec") if isinstance(node, dict) else None
    kwargs = children[1] if isinstance(children, list) and len(children) == 2 else None
    context = kwargs.get("context") if isinstance(kwargs, dict) else None
    if not isinstance(context, str):
        return []
    try:
        keys = json.loads(context)
    except (json.JSONDecodeError, RecursionError):
        return []
    return keys if isinstance(keys, list) else []


# --- TorchScript archives -------------------------------------------------------------------------


def scan_torchscript(archive: VerifiedZip) -> None:
    """TorchScript code runs when torch.jit.load restores objects (their __setstate__) and when the
    module runs; its pickles are read by TorchScript's own unpickler, which imports no Python. So the
    code may define no __setstate__, call no operator that opens files, and call none of the views
    that take sizes and strides without a bounds check (as a function or as a tensor's method)."""
    calls = "|".join(sorted(file_operator_names() | UNCHECKED_VIEWS))
    views = "|".join(sorted(UNCHECKED_VIEWS))
    pattern = re.compile(rf"\bdef\s+__setstate__\b|\b(?:torch|ops\.\w+)\.(?:{calls})\b|\.(?:{views})\s*\(")
    for name in archive.names:
        if name.startswith("code/") and name.endswith(".py"):
            match = pattern.search(archive.read(name).decode("utf-8", errors="replace"))
            if match:
                found = match.group(0).rstrip("( ")
                view = found.rsplit(".", 1)[-1] in UNCHECKED_VIEWS
                what = ", a view without a bounds check" if view else " when loaded or run"
                raise UnsafeContent(shorten(f"{archive.path.name}: {name} runs '{found}'{what}. {TRUST_HINT}"))


@contextlib.contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Every torch.load inside uses the weights_only unpickler, whatever its call site asks for
    (TORCH_FORCE_WEIGHTS_ONLY_LOAD, read by torch.load on each call)."""
    saved = {key: os.environ.get(key) for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
