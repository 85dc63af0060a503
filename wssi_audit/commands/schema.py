"""`wssi-audit schema`: print the JSON Schema of the report (schema_version 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_support import console, handle_errors, write_atomic
from ..report import schema_text


def register(app: typer.Typer) -> None:
    @app.command("schema")
    @handle_errors
    def schema_command(
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the schema here instead of stdout."),
    ) -> None:
        """Print the JSON Schema that every `--format json` report validates against."""
        text = schema_text()
        if output is None:
            typer.echo(text, nl=False)
            return
        write_atomic(output, text)
        console.print(f"schema written to {output}", highlight=False)
