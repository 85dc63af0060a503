"""The `wssi-audit` command line: a thin layer over the Python API."""

from __future__ import annotations

import gc
import importlib
import sys

import typer
from typer.core import TyperGroup

from ._version import __version__
from .cli_support import set_debug
from .commands import COMMAND_MODULES

DEBUG = "--debug"


def normalize_arguments(args: list[str], commands: set[str]) -> list[str]:
    """`--debug` anywhere on the line (before `--`) becomes the root option; a first argument that
    is no command name means `audit` (`wssi-audit MODEL` is `wssi-audit audit MODEL`)."""
    end = args.index("--") if "--" in args else len(args)
    head, tail = args[:end], args[end:]
    debug = DEBUG in head
    head = [a for a in head if a != DEBUG]
    if head and not head[0].startswith("-") and head[0] not in commands:
        head.insert(0, "audit")
    return [DEBUG] * debug + head + tail


class CommandLine(TyperGroup):
    """The root group: applies `normalize_arguments` for every caller (console script, tests)."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        return super().parse_args(ctx, normalize_arguments(list(args), set(self.commands)))


app = typer.Typer(
    cls=CommandLine,
    name="wssi-audit",
    help=(
        "Audit the weight scales of positively homogeneous PyTorch networks, and train them better. "
        "`wssi-audit MODEL` is short for `wssi-audit audit MODEL`.\n\n"
        "Exit codes: 0 ok, 1 a check failed, 2 usage or input error, 3 analysis inconsistency "
        "(a chain failed its scale-shift self-check), 4 internal error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich's option panels truncate flag names at 80 columns and read help text
    # as markup ("[tool.wssi-audit]" vanished).
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wssi-audit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, DEBUG, help="Show full tracebacks on errors (anywhere on the line)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Exit codes: 0 ok, 1 a check failed, 2 usage or input error, 3 analysis inconsistency
    (a chain failed its scale-shift self-check), 4 internal error."""
    set_debug(debug)


for _name in COMMAND_MODULES:
    importlib.import_module(f".commands.{_name}", __package__).register(app)


def _quiet_torch() -> None:
    """torch's deprecation warnings and export logs are noise in a report; --debug keeps them."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
    logging.getLogger("torch").setLevel(logging.ERROR)


# Commands that hold nothing but their output once they return: the console script ends them
# without the interpreter's teardown (0.6 s after a ResNet-50 audit, a tenth of the whole run:
# collecting the objects torch.export.load made, and torch's own finalizers). Training commands
# (finetune, experiment, demo) keep the normal exit: their process groups and loggers clean up.
FAST_EXIT_COMMANDS = frozenset({"audit", "check", "balance", "export", "schema"})
# Those runs build a few million objects (torch's modules, the graph, the report) that live until
# the exit. At Python's default thresholds the cycle collector walks all of them in four full
# collections and frees almost nothing: 0.19 s of a ResNet-50 audit. It stays on, 140 times rarer.
SHORT_RUN_GC_THRESHOLDS = (100_000, 50, 100)


def _exit_now(code: object) -> None:
    """SystemExit's meaning of `code` (None: 0, a string: printed, then 1), everything flushed."""
    import logging
    import os

    if isinstance(code, str):
        sys.stderr.write(code + "\n")
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code if isinstance(code, int) else 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point; `wssi-audit MODEL ...` is short for `wssi-audit audit MODEL ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    if DEBUG not in args[:end]:
        _quiet_torch()
    command = next((a for a in normalize_arguments(args, set(COMMAND_MODULES)) if a != DEBUG), None)
    if argv is None and command in FAST_EXIT_COMMANDS:  # a process of its own, not a caller's
        gc.set_threshold(*SHORT_RUN_GC_THRESHOLDS)
    try:
        app(args=args, prog_name="wssi-audit")
    except SystemExit as done:
        if argv is None and command in FAST_EXIT_COMMANDS:
            _exit_now(done.code)
        raise


if __name__ == "__main__":
    main()
