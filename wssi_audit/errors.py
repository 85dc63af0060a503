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
