"""Model files -> a model object, safely: nothing is unpickled unless the user says so.

Formats: torch.export archives (.pt2), state dicts (.pt/.pth/.bin/.safetensors) with an
architecture factory, pickled whole modules (only with trust_pickle), TorchScript
archives (converted with torch.export when an input shape is known), ONNX (.onnx).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, TraceError, describe, shorten

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoadedModel:
    model: Any  # nn.Module | torch.export.ExportedProgram | onnx.ModelProto
    format: str  # "torch.export", "state_dict", "safetensors", "pickle", "torchscript", "onnx"
    source: str
    example_inputs: tuple[Any, ...] | None = None


def parse_input_shape(text: str | None) -> list[tuple[int, ...]] | None:
    """'1,3,32,32' -> [(1,3,32,32)]; several inputs separated by ';'."""
    if text is None or text == "":
        return None
    shapes = []
    for part in text.split(";"):
        try:
            dims = tuple(int(d) for d in part.split(",") if d.strip())
        except ValueError:
            raise InputError(f"bad --input-shape '{text}': expected integers like 1,3,32,32") from None
        if not dims or any(d <= 0 for d in dims):
            raise InputError(f"bad --input-shape '{text}': every dimension must be a positive integer")
        shapes.append(dims)
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
            raise InputError(f"cannot import '{name}': {type(error).__name__}: {error}") from None


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """'package.module:factory' -> the callable (a class or function returning an nn.Module)."""
    if ":" not in spec:
        raise InputError(f"bad --arch '{spec}': expected 'package.module:factory'")
    module_name, _, attr = spec.partition(":")
    _import_from_working_directory()
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise InputError(f"cannot import '{module_name}' for --arch: {type(error).__name__}: {error}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InputError(f"'{module_name}' has no attribute '{attr}' (from --arch '{spec}')")
    if not callable(factory):
        raise InputError(f"--arch '{spec}' is not callable")
    return factory


def _build_from_state_dict(state: dict[str, torch.Tensor], arch: str | None, path: Path) -> nn.Module:
    if arch is None:
        raise InputError(
            f"{path.name} holds a state dict (weights only); name its architecture with --arch package.module:factory"
        )
    factory = resolve_factory(arch)
    try:
        model = factory()
    except Exception as error:
        raise InputError(f"--arch factory '{arch}' failed: {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch factory '{arch}' returned {type(model).__name__}, not an nn.Module")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise InputError(shorten(f"state dict does not match --arch '{arch}': {detail}", 400)) from None
    return model.eval()


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """A dict of tensors, possibly under a 'state_dict' or 'model' key (training checkpoints)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state_dict(obj[key])
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    return None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("constants.pkl") or "/code/" in name for name in names)


def _load_torchscript(path: Path, example_inputs: tuple[Any, ...] | None) -> LoadedModel:
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:
        raise InputError(f"cannot read TorchScript archive {path.name}: {describe(error)}") from None
    if example_inputs is None:
        raise InputError(
            f"{path.name} is a TorchScript archive: give --input-shape so it can be converted "
            "with torch.export, or save the model with torch.export.save (.pt2)"
        )
    from .frontends.torch_support import require

    require("torchscript", "save the model with torch.export.save (.pt2) instead")
    try:
        from torch._export.converter import TS2EPConverter

        program = TS2EPConverter(scripted, tuple(example_inputs)).convert()
    except Exception as error:
        raise TraceError(
            f"TorchScript archive {path.name} could not be converted ({type(error).__name__}); "
            "save the model with torch.export.save (.pt2) instead"
        ) from None
    return LoadedModel(program, "torchscript", str(path), tuple(example_inputs))


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    imports: Sequence[str] = (),
    example_inputs: tuple[Any, ...] | None = None,
) -> LoadedModel:
    """Load a model file; raises `InputError` with one clear line on any problem."""
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
        if not zipfile.is_zipfile(path):
            raise InputError(f"cannot read torch.export archive {path.name}: not a zip archive (truncated or not .pt2)")
        try:
            with _silenced("torch.export"):
                program = torch.export.load(str(path))
        except Exception as error:
            raise InputError(f"cannot read torch.export archive {path.name}: {describe(error)}") from None
        return LoadedModel(program, "torch.export", str(path), example_inputs)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            state = load_file(str(path))
        except Exception as error:
            raise InputError(f"cannot read safetensors file {path.name}: {describe(error)}") from None
        return LoadedModel(_build_from_state_dict(state, arch, path), "safetensors", str(path), example_inputs)
    if suffix not in STATE_DICT_SUFFIXES and not zipfile.is_zipfile(path):
        raise InputError(
            f"unknown model format '{path.suffix or path.name}': expected .pt2, .pt/.pth, .safetensors or .onnx"
        )
    if _is_torchscript(path):
        return _load_torchscript(path, example_inputs)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error) and "global" not in str(error):
            raise InputError(f"cannot read {path.name} as a PyTorch file: {describe(error)}") from None
        if not trust_pickle:
            raise InputError(
                f"{path.name} contains pickled Python objects ({_pickle_global(error)}); refusing to "
                "unpickle it. If you trust this file, pass --trust-pickle (and --import for its classes)"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error:
            raise InputError(f"cannot unpickle {path.name}: {describe(error)} (try --import for its classes)") from None
    except Exception as error:
        raise InputError(f"cannot read {path.name} as a PyTorch file: {describe(error)}") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickle", str(path), example_inputs)
    if isinstance(obj, torch.export.ExportedProgram):
        return LoadedModel(obj, "torch.export", str(path), example_inputs)
    state = _unwrap_state_dict(obj)
    if state is None:
        raise InputError(f"{path.name} holds a {type(obj).__name__}, neither a module nor a state dict")
    return LoadedModel(_build_from_state_dict(state, arch, path), "state_dict", str(path), example_inputs)


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


def _pickle_global(error: BaseException) -> str:
    text = str(error)
    marker = "GLOBAL "
    if marker in text:
        name = text.split(marker, 1)[1].split()[0]
        return f"it needs {name}"
    return "not loadable with weights_only=True"
