"""How long a ResNet-50 audit takes, next to weightwatcher on the same model.

    .venv/bin/python benchmarks/audit_speed.py [--input-size 224] [--repeats 3]

Times (best of --repeats, wall clock):
  analysis      audit(model, (x,), verify=False): tracing + structure + metrics
  + verify      audit(model, (x,)): the same plus the float64 scale-shift self-check
  CLI           `wssi-audit resnet50.pt2` as a subprocess (Python start, imports, loading
                the archive, analysis, verification, rendering), on a .pt2 saved to a temp dir
  weightwatcher WeightWatcher(model=model).analyze() in this process (its default analysis),
                and its whole run as a subprocess (Python start, imports, resnet50(), analyze())

weightwatcher is optional: put it on PYTHONPATH (see docs/benchmarks.md) or it is skipped.
The model is torchvision's resnet50 with random weights (weights=None); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def best_of(repeats: int, run: Callable[[], Any]) -> tuple[float, Any]:
    """Minimum wall time over `repeats` runs: the least disturbed by other load on the machine."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def cpu_seconds(run: Callable[[], Any]) -> float:
    """CPU time (all threads) of one in-process run: less sensitive to other jobs than wall time."""
    start = time.process_time()
    run()
    return time.process_time() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cli_command(archive: Path) -> list[str]:
    """The installed `wssi-audit` next to this interpreter, else `python -m wssi_audit`."""
    script = Path(sys.executable).with_name("wssi-audit")
    if script.exists():
        return [str(script), str(archive)]
    found = shutil.which("wssi-audit")
    return [found, str(archive)] if found else [sys.executable, "-m", "wssi_audit", str(archive)]


def run_cli(command: list[str]) -> None:
    env = {**os.environ, "COLUMNS": "160"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


# The peer's whole run, as a subprocess like the CLI: start, imports, model, analyze().
PEER_SCRIPT = (
    "import logging, torch, torchvision, weightwatcher; "
    "logging.getLogger('weightwatcher').setLevel(logging.ERROR); torch.manual_seed(0); "
    "weightwatcher.WeightWatcher(model=torchvision.models.resnet50(weights=None).eval()).analyze()"
)


def run_weightwatcher_process() -> None:
    run_cli([sys.executable, "-c", PEER_SCRIPT])


def run_weightwatcher(model: torch.nn.Module) -> Any:
    import weightwatcher

    return weightwatcher.WeightWatcher(model=model).analyze()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=224, help="spatial size of the 1x3xSxS example input")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is reported)")
    parser.add_argument("--peer-repeats", type=int, default=1, help="runs of weightwatcher (it is slow)")
    args = parser.parse_args()

    import torchvision

    from wssi_audit import audit

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, args.input_size, args.input_size)

    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}"
    )
    print(f"model: torchvision resnet50, random init, input 1x3x{args.input_size}x{args.input_size}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    audit(model, (x,), verify=False)  # warm-up: first-call costs of torch (not of wssi-audit)
    analysis, report = best_of(args.repeats, lambda: audit(model, (x,), verify=False))
    verified, report = best_of(args.repeats, lambda: audit(model, (x,)))
    assert report.summary.all_verified is True, "self-check failed"
    analysis_cpu = cpu_seconds(lambda: audit(model, (x,), verify=False))

    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "resnet50.pt2"
        torch.export.save(torch.export.export(model, (x,), strict=False), archive)
        command = cli_command(archive)
        cli, _ = best_of(args.repeats, lambda: run_cli(command))

    rows = [
        ("wssi-audit analysis (no verification)", analysis),
        ("wssi-audit analysis + verification", verified),
        (f"wssi-audit CLI: {Path(command[0]).name} resnet50.pt2", cli),
    ]
    try:
        import weightwatcher

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        peer_name = f"weightwatcher {weightwatcher.__version__}: WeightWatcher(model).analyze()"
        peer, _ = best_of(args.peer_repeats, lambda: run_weightwatcher(model))
        rows.append((peer_name, peer))
        peer_process, _ = best_of(args.peer_repeats, run_weightwatcher_process)
        rows.append(("weightwatcher whole run (python -c: imports, resnet50(), analyze())", peer_process))
    except ImportError:
        peer = peer_process = None
        print("weightwatcher not installed: skipped")

    print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    width = max(len(name) for name, _ in rows)
    for index, (name, seconds) in enumerate(rows):
        ratio = ""
        if peer is not None and peer_process is not None and index < 3:
            ratio = (
                f"   weightwatcher analyze() / this: {peer / seconds:5.2f}"
                f"   whole run / this: {peer_process / seconds:5.2f}"
            )
        print(f"{name:<{width}}  {seconds:8.3f} s{ratio}")
    print()
    print(f"analysis CPU time (one run, {torch.get_num_threads()} threads): {analysis_cpu:.3f} s")
    print(f"analysis under 1 s: {'yes' if analysis < 1.0 else 'no'} ({analysis:.3f} s)")
    if peer is not None and peer_process is not None:
        verdict = "yes" if cli < peer else "no"
        print(f"CLI faster than weightwatcher's analyze(): {verdict} ({cli:.2f} s vs {peer:.2f} s)")
        print(
            f"CLI faster than weightwatcher's whole run: {'yes' if cli < peer_process else 'no'} "
            f"({cli:.2f} s vs {peer_process:.2f} s)"
        )


if __name__ == "__main__":
    main()
