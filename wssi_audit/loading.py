"""Model files -> a model object, safely: nothing in a file runs as code unless the user says so.

Formats: torch.export archives (.pt2, scanned by safe_archive before torch reads them), state
dicts (.pt/.pth/.bin/.ckpt, training checkpoints included, .safetensors) with an architecture
factory, pickled whole modules (only with trust_pickle), TorchScript archives (converted with
torch.export when an input shape is known), ONNX (.onnx, external data kept inside its folder).
Every zip-based file is read once, its CRCs checked, and torch reads those bytes from memory.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, TraceError, describe, shorten
from .safe_archive import (
    VerifiedZip,
    physical_memory,
    pickle_global,
    read_verified_zip,
    scan_pt2,
    scan_torchscript,
    weights_only_unpickling,
)
from .safe_graph import UnsafeContent, check_program

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoadedModel:
    model: Any  # nn.Module | torch.export.ExportedProgram | onnx.ModelProto
    format: str  # "torch.export", "state_dict", "safetensors", "pickle", "torchscript", "onnx"
    source: str
    example_inputs: tuple[Any, ...] | None = None
    checkpoint: Checkpoint | None = None  # set when a state dict came from inside a training checkpoint


# Inputs are float32 and the self-check keeps a float64 copy next to the activations: an input
# whose float64 copy exceeds a quarter of the machine's memory cannot be audited.
INPUT_MEMORY_FRACTION = 0.25
DIMENSION = re.compile(r"\s*[0-9]+\s*")


def parse_input_shape(text: str | None) -> list[tuple[int, ...]] | None:
    """'1,3,32,32' -> [(1,3,32,32)]; several inputs separated by ';'. Empty dimensions (1,,8),
    zeros and sizes the machine cannot hold are input errors."""
    if text is None or text == "":
        return None
    shapes = []
    for part in text.split(";"):
        fields = part.split(",")
        if not all(DIMENSION.fullmatch(d) for d in fields):
            raise InputError(f"bad --input-shape '{text}': expected positive integers like 1,3,32,32")
        dims = tuple(int(d) for d in fields)
        if any(d <= 0 for d in dims):
            raise InputError(f"bad --input-shape '{text}': every dimension must be a positive integer")
        shapes.append(dims)
    elements = sum(math.prod(dims) for dims in shapes)
    budget = INPUT_MEMORY_FRACTION * physical_memory()
    if elements * 8 > budget:
        raise InputError(
            f"--input-shape '{text}' has {elements:.3g} elements: their float64 copy needs "
            f"{elements * 8 / 2**30:.3g} GiB, more than {INPUT_MEMORY_FRACTION:.0%} of this machine's "
            f"{physical_memory() / 2**30:.0f} GiB"
        )
    return shapes


def random_inputs(shapes: Sequence[tuple[int, ...]] | None, seed: int = 0) -> tuple[torch.Tensor, ...] | None:
    if shapes is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


def _import_from_working_directory() -> None:
    """User packages named by --import or --arch resolve from the current directory, as `python -m` would."""
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, ".")


def import_modules(names: Sequence[str]) -> None:
    """Make user classes importable (for pickled modules and factories)."""
    _import_from_working_directory()
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            raise InputError(f"cannot import '{name}': {describe(error)}") from None


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """'package.module:factory' -> the callable (a class or function returning an nn.Module)."""
    if ":" not in spec:
        raise InputError(f"bad --arch '{spec}': expected 'package.module:factory'")
    module_name, _, attr = spec.partition(":")
    _import_from_working_directory()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise InputError(f"cannot import '{module_name}' for --arch: {describe(error)}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InputError(f"'{module_name}' has no attribute '{attr}' (from --arch '{spec}')")
    if not callable(factory):
        raise InputError(f"--arch '{spec}' is not callable")
    return factory


@dataclass(frozen=True)
class Checkpoint:
    """Where a state dict sat inside a training checkpoint, so that it can be written back in place."""

    container: Any  # the whole loaded object (a dict)
    key_path: tuple[str, ...]  # keys leading to the state dict ("state_dict",)
    prefix: str  # stripped from every model key ("model." for a Lightning module's `self.model`)

    def with_state(self, state: dict[str, torch.Tensor]) -> Any:
        """A copy of the checkpoint with the model's entries replaced; every other key kept."""
        container = dict(self.container)
        outer = container
        for key in self.key_path[:-1]:
            outer[key] = dict(outer[key])
            outer = outer[key]
        if self.key_path:
            nested = dict(outer[self.key_path[-1]])
            nested.update({self.prefix + k: v for k, v in state.items()})
            outer[self.key_path[-1]] = nested
            return container
        container.update({self.prefix + k: v for k, v in state.items()})
        return container


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def _find_state_dict(obj: Any, path: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], tuple[str, ...]] | None:
    """A dict of tensors, possibly under 'state_dict', 'model_state_dict' or 'model' (training
    checkpoints, Lightning's included); with the keys that lead to it."""
    if not isinstance(obj, dict):
        return None
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], dict):
            found = _find_state_dict(obj[key], (*path, key))
            if found is not None:
                return found
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and (len(tensors) == len(obj) or path):
        return tensors, path
    return None


def _match_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> str:
    """The key prefix that makes `state` fit a module with keys `expected` ("" when it already fits):
    Lightning saves `self.model`'s weights as "model.<key>", next to other modules' weights."""
    if expected <= set(state):
        return ""
    candidates = sorted({k[: i + 1] for k in state for i, c in enumerate(k) if c == "."}, key=len)
    for prefix in candidates:
        if expected <= {k[len(prefix) :] for k in state if k.startswith(prefix)}:
            return prefix
    return ""


def _build_from_state_dict(
    state: dict[str, torch.Tensor], arch: str | None, path: Path, key_path: tuple[str, ...] = ()
) -> tuple[nn.Module, str]:
    """The --arch module with `state` loaded; also the key prefix that was stripped."""
    if arch is None:
        raise InputError(
            f"{path.name} holds a state dict (weights only); name its architecture with --arch package.module:factory"
        )
    factory = resolve_factory(arch)
    try:
        model = factory()
    except Exception as error:
        raise InputError(f"--arch factory '{arch}' failed: {describe(error)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch factory '{arch}' returned {type(model).__name__}, not an nn.Module")
    prefix = _match_prefix(state, set(model.state_dict()))
    if prefix or key_path:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise InputError(shorten(f"state dict does not match --arch '{arch}': {detail}", 400)) from None
    return model.eval(), prefix


def _is_torchscript(archive: VerifiedZip) -> bool:
    return any(name == "constants.pkl" or name.startswith("code/") for name in archive.names)


def _load_torchscript(archive: VerifiedZip, example_inputs: tuple[Any, ...] | None, trust_pickle: bool) -> LoadedModel:
    """torch.jit.load runs the archive's TorchScript (its __setstate__ methods at load): scanned first."""
    path = archive.path
    if not trust_pickle:
        scan_torchscript(archive)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": we know
            scripted = torch.jit.load(archive.buffer(), map_location="cpu")
    except Exception as error:
        raise InputError(f"cannot read TorchScript archive {path.name}: {describe(error)}") from None
    if example_inputs is None:
        raise InputError(
            f"{path.name} is a TorchScript archive: give --input-shape so it can be converted "
            "with torch.export, or save the model with torch.export.save (.pt2)"
        )
    try:
        from torch._export.converter import TS2EPConverter

        with _silenced("torch"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(scripted, tuple(example_inputs)).convert()
    except Exception as error:
        raise TraceError(
            f"TorchScript archive {path.name} could not be converted ({type(error).__name__}); "
            "save the model with torch.export.save (.pt2) instead"
        ) from None
    if not trust_pickle:
        check_program(program)
    return LoadedModel(program, "torchscript", str(path), tuple(example_inputs))


def _load_pt2(path: Path, trust_pickle: bool, for_analysis: bool = False) -> torch.export.ExportedProgram:
    """Scan first (safe_archive), then read the scanned bytes, then check the graph and its recorded
    sizes (recorded_sizes). For an analysis, pt2_reader builds the program when it can (a second
    faster: no torch._dynamo); its node values are meta tensors, so a program to save or re-export
    comes from torch.export.load."""
    if not zipfile.is_zipfile(path):
        raise InputError(f"cannot read torch.export archive {path.name}: not a zip archive (truncated or not .pt2)")
    archive, _ = scan_pt2(path, trust=trust_pickle)
    program = _read_program(archive) if for_analysis else None
    if program is None:
        guard = contextlib.nullcontext() if trust_pickle else weights_only_unpickling()
        try:
            with _silenced("torch.export"), guard:
                program = torch.export.load(archive.buffer())
        except Exception as error:
            raise InputError(f"cannot read torch.export archive {path.name}: {describe(error)}") from None
    if not trust_pickle:
        try:
            check_program(program)
        except UnsafeContent as error:
            raise UnsafeContent(shorten(f"{path.name}: {error}")) from None
    from .frontends.recorded_sizes import check_recorded_sizes
    from .frontends.torch_export import example_inputs_of

    try:  # before anything runs it: a corrupt size or a run larger than memory is the file's fault
        check_recorded_sizes(program, example_inputs_of(program))
    except InputError as error:
        raise InputError(shorten(f"{path.name}: {error}")) from None
    return program


def _read_program(archive: VerifiedZip) -> torch.export.ExportedProgram | None:
    """pt2_reader's program, or None where it does not build this archive (torch.export.load does)."""
    from .pt2_reader import read_program

    try:
        with weights_only_unpickling():
            return read_program(archive)
    except Exception:  # Unsupported, or a malformed part: torch.export.load reads it or says why
        return None


def _load_pickled(path: Path, data: io.BytesIO, trust_pickle: bool) -> Any:
    """torch.load with torch's weights_only unpickler; the full unpickler only with --trust-pickle."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error) and "global" not in str(error):
            raise InputError(f"cannot read {path.name} as a PyTorch file: {describe(error)}") from None
        if not trust_pickle:
            raise InputError(
                f"{path.name} contains pickled Python objects ({pickle_global(error)}); refusing to "
                "unpickle it. If you trust this file, pass --trust-pickle (and --import for its classes)"
            ) from None
    except Exception as error:
        raise InputError(f"cannot read {path.name} as a PyTorch file: {describe(error)}") from None
    data.seek(0)
    try:
        return torch.load(data, map_location="cpu", weights_only=False)
    except Exception as error:
        raise InputError(f"cannot unpickle {path.name}: {describe(error)} (try --import for its classes)") from None


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    imports: Sequence[str] = (),
    example_inputs: tuple[Any, ...] | None = None,
    for_analysis: bool = False,
) -> LoadedModel:
    """Load a model file; raises `InputError` with one clear line on any problem. Nothing in the
    file runs as code (pickles, graph expressions, native libraries) unless `trust_pickle`.
    `for_analysis`: the model is only analysed (audit, check), not saved or re-exported."""
    from .frontends.torch_support import require_supported_torch

    require_supported_torch()
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a model file")
    if imports:
        import_modules(imports)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from .frontends.onnx_frontend import load_onnx

        return LoadedModel(load_onnx(path), "onnx", str(path), example_inputs)
    if suffix == ".pt2":
        program = _load_pt2(path, trust_pickle, for_analysis)
        return LoadedModel(program, "torch.export", str(path), example_inputs)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as error:
            raise InputError(f"cannot read safetensors file {path.name}: {describe(error)}") from None
        model, _ = _build_from_state_dict(state, arch, path)
        return LoadedModel(model, "safetensors", str(path), example_inputs)
    if suffix not in STATE_DICT_SUFFIXES and not zipfile.is_zipfile(path):
        raise InputError(
            f"unknown model format '{path.suffix or path.name}': expected .pt2, .pt/.pth, .safetensors or .onnx"
        )
    # Read once: the CRC-checked bytes decide the format and are what torch reads.
    if zipfile.is_zipfile(path):
        archive = read_verified_zip(path, "PyTorch file")
        if _is_torchscript(archive):
            return _load_torchscript(archive, example_inputs, trust_pickle)
        data = archive.buffer()
    else:
        data = io.BytesIO(path.read_bytes())
    obj = _load_pickled(path, data, trust_pickle)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickle", str(path), example_inputs)
    if isinstance(obj, torch.export.ExportedProgram):
        return LoadedModel(obj, "torch.export", str(path), example_inputs)
    found = _find_state_dict(obj)
    if found is None:
        raise InputError(f"{path.name} holds a {type(obj).__name__}, neither a module nor a state dict")
    state, key_path = found
    model, prefix = _build_from_state_dict(state, arch, path, key_path)
    checkpoint = Checkpoint(obj, key_path, prefix) if (key_path or len(state) != len(obj) or prefix) else None
    return LoadedModel(model, "state_dict", str(path), example_inputs, checkpoint)


@contextlib.contextmanager
def _silenced(logger_name: str) -> Iterator[None]:
    """torch logs a traceback before raising on a bad archive; the user gets our one line."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
