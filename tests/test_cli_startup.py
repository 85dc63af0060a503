"""`wssi-audit --help`, `--version`, every command's `--help` and `schema` answer without importing
torch (it costs seconds: importing torch, and torch.export's loader with torch._dynamo, is most of a
ResNet-50 audit's fixed cost), and `import wssi_audit` is as cheap; the API's names load on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from wssi_audit.commands import COMMAND_MODULES

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
from wssi_audit import cli
seen = {}
for args in json.loads(sys.argv[1]):
    try:
        cli.app(args=args, prog_name="wssi-audit")
    except SystemExit as done:
        seen[" ".join(args)] = [done.code, "torch" in sys.modules]
print(json.dumps(seen))
"""


def probe(commands: list[list[str]]) -> dict[str, list]:
    """{command line: [exit code, whether torch had been imported after it]} in one fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(commands)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_help_version_and_schema_do_not_import_torch() -> None:
    commands = [["--help"], ["--version"], ["schema"], *([name, "--help"] for name in COMMAND_MODULES)]
    seen = probe(commands)
    assert set(seen) == {" ".join(c) for c in commands}
    for line, (code, torch_imported) in seen.items():
        assert code in (0, None), line
        assert not torch_imported, f"`wssi-audit {line}` imported torch"


def test_the_probe_sees_torch_imported() -> None:
    """Control: an audit does import torch, and the probe reports it (the test above could fail)."""
    seen = probe([["--help"], ["audit", str(ROOT / "no-such-model.pt2")]])
    assert seen["--help"][1] is False
    assert seen[f"audit {ROOT / 'no-such-model.pt2'}"] == [2, True]


def test_import_wssi_audit_is_cheap_and_its_names_load_on_first_use() -> None:
    script = (
        "import sys, wssi_audit\n"
        "before = 'torch' in sys.modules\n"
        "from wssi_audit import Analysis, Report, WeightScaleRegularizer, analyze, attach, audit\n"
        "assert callable(audit) and callable(analyze) and callable(attach), (audit, analyze, attach)\n"
        "assert wssi_audit.audit is audit and isinstance(Analysis, type) and isinstance(Report, type)\n"
        "assert set(wssi_audit.__all__) <= set(dir(wssi_audit))\n"
        "print(before, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
