"""CLI commands, one module each; every module defines `register(app)`.

To add a command: write `commands/<name>.py` with `register(app: typer.Typer)` and list it here.
"""

COMMAND_MODULES = ["audit", "demo", "check", "balance", "export", "finetune", "experiment", "schema"]
