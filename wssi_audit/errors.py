"""Errors users see as one line, each with its documented exit code."""

from __future__ import annotations


class WssiError(Exception):
    """Base class: the message is the one line printed; `exit_code` is what the CLI returns."""

    exit_code = 2


class InputError(WssiError):
    """A missing, unreadable or unsupported model file, or a bad option value (exit 2)."""

    exit_code = 2


class TraceError(WssiError):
    """The model could not be turned into a graph at all (exit 2)."""

    exit_code = 2


class AnalysisInconsistency(WssiError):
    """A chain failed its scale-shift self-check: an analyzer bug (exit 3)."""

    exit_code = 3


EXIT_OK = 0
EXIT_RULE_FAILED = 1
EXIT_USAGE = 2
EXIT_INCONSISTENT = 3


def shorten(text: str, limit: int = 300) -> str:
    """`text` cut to at most `limit` characters at a word boundary, marked with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def describe(error: BaseException, limit: int = 240) -> str:
    """'ErrorType: first line of its message', shortened at a word boundary: what users see of
    an exception raised inside torch, onnx or a user's factory."""
    lines = str(error).strip().splitlines()
    return shorten(f"{type(error).__name__}: {lines[0] if lines else ''}", limit)
