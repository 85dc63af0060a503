"""Shared plumbing for CLI commands: one-line errors with documented exit codes, atomic writes."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .errors import EXIT_USAGE, WssiError, describe

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
    """Turn exceptions into one line on stderr and an exit code; a traceback only with --debug."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except WssiError as error:
            if debug_enabled():
                raise
            raise fail(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as error:
            if debug_enabled():
                raise
            raise fail(f"internal error: {describe(error)} (rerun with --debug)", 4) from None

    return wrapper  # type: ignore[return-value]


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: never a partial output file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(path: str | Path, saver: Callable[[str], None]) -> None:
    """Like write_atomic for writers that take a path (torch.save, torch.export.save, onnx.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        saver(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
