"""How long the answers that need no model take: `wssi-audit --help`, `--version`, `schema` and a
command's `--help`, next to a process that only imports torch.

    .venv/bin/python benchmarks/cli_startup.py [--rounds 10]

Whole processes, timed side by side in rounds (import torch, --help, --version, ..., import torch,
...); each round gives every command's time over `import torch`, and the medians (min, max) of those
ratios are printed. Goal: well under 1 (none of them imports torch; tests/test_cli_startup.py checks
that they do not).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cli() -> list[str]:
    script = Path(sys.executable).with_name("wssi-audit")
    if script.exists():
        return [str(script)]
    found = shutil.which("wssi-audit")
    return [found] if found else [sys.executable, "-m", "wssi_audit"]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-1000:]!r}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "wssi-audit --help": [*cli(), "--help"],
        "wssi-audit --version": [*cli(), "--version"],
        "wssi-audit schema": [*cli(), "schema"],
        "wssi-audit check --help": [*cli(), "check", "--help"],
    }
    for command in commands.values():
        timed(command)  # warm-up: file caches, bytecode
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.rounds} rounds")
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            times[name].append(timed(command))
    base = times["import torch"]
    print(f"{'import torch':26s} seconds median {statistics.median(base):.3f}")
    for name, values in times.items():
        if name == "import torch":
            continue
        ratios = [v / b for v, b in zip(values, base)]
        print(
            f"{name:26s} seconds median {statistics.median(values):.3f}; / import torch per round: "
            f"median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
