"""Shared plumbing for CLI commands: one-line errors with documented exit codes, atomic writes."""

from __future__ import annotations

import functools
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .errors import EXIT_USAGE, InputError, WssiError, describe, shorten

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
error_console = Console(stderr=True)

# Set by the root callback; commands read it through `debug_enabled()`.
_STATE = {"debug": False}


def set_debug(value: bool) -> None:
    _STATE["debug"] = value


def debug_enabled() -> bool:
    return _STATE["debug"] or os.environ.get("WSSI_AUDIT_DEBUG") == "1"


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    error_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(function: F) -> F:
    """Turn exceptions into one line on stderr and an exit code. --debug adds the traceback above
    that line and keeps the exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except WssiError as error:
            _traceback_if_debug()
            raise fail(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as error:
            _traceback_if_debug()
            raise fail(f"internal error: {describe(error)} (rerun with --debug)", 4) from None

    return wrapper  # type: ignore[return-value]


def _traceback_if_debug() -> None:
    if debug_enabled():
        error_console.file.write(traceback.format_exc())


def _first_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_output_file(path: Path, option: str) -> None:
    """Before any work: `path` can be written as a file (not a folder; its folder creatable and writable)."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder: give a file name")
    parent = _first_existing(path.absolute().parent)
    if not parent.is_dir():
        raise InputError(f"cannot write {option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {option} {path}: {parent} is not writable")


def check_output_folder(path: Path, option: str) -> None:
    """Before any work: `path` is, or can be created as, a writable folder."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file: give a folder")
    existing = _first_existing(path.absolute())
    if not existing.is_dir():
        raise InputError(f"cannot create {option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {option} {path}: {existing} is not writable")


def _write_error(path: Path, error: OSError) -> InputError:
    reason = error.strerror or describe(error)
    return InputError(shorten(f"cannot write {path}: {reason}"))


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a partial output file."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, error) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(path: str | Path, saver: Callable[[str], None]) -> None:
    """Like write_atomic for writers that take a path (torch.save, torch.export.save, onnx.save)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        saver(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, error) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
