"""The `wssi-audit` command line: a thin layer over the Python API."""

from __future__ import annotations

import importlib
import sys

import typer

from ._version import __version__
from .cli_support import set_debug
from .commands import COMMAND_MODULES

app = typer.Typer(
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
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Exit codes: 0 ok, 1 a check failed, 2 usage or input error, 3 analysis inconsistency
    (a chain failed its scale-shift self-check), 4 internal error."""
    set_debug(debug)


for _name in COMMAND_MODULES:
    importlib.import_module(f".commands.{_name}", __package__).register(app)


def _command_names() -> set[str]:
    names = set()
    for command in app.registered_commands:
        names.add(command.name or command.callback.__name__.replace("_", "-"))
    return names


def _quiet_torch() -> None:
    """torch's deprecation warnings and export logs are noise in a report; --debug keeps them."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
    logging.getLogger("torch").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Entry point; `wssi-audit MODEL ...` is short for `wssi-audit audit MODEL ...`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in args:
        _quiet_torch()
    first = next((i for i, a in enumerate(args) if a not in ("--debug",)), None)
    if first is not None and not args[first].startswith("-") and args[first] not in _command_names():
        args.insert(first, "audit")
    app(args=args, prog_name="wssi-audit")


if __name__ == "__main__":
    main()
