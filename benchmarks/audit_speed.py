"""How long `wssi-audit model.pt2` takes on torchvision's ResNet-50, next to a floor and to weightwatcher.

    .venv/bin/python benchmarks/audit_speed.py [--rounds 5] [--input-size 224]

Three whole processes, timed side by side in rounds (floor, CLI, weightwatcher, floor, CLI, ...) so
that a machine whose speed drifts affects all of them alike; each round gives the ratios

  CLI / floor            goal <= 1.3: the floor imports torch and torchvision, loads the archive's
                         weights (torch.export.load) and computes every weight's norm;
  weightwatcher / CLI    goal >= 2: weightwatcher's whole run (imports, resnet50(), analyze()).

and the medians (with min and max) over the rounds are printed. `--variants` adds the CLI with
`--no-measure` and with `--no-verify --no-measure` to the rounds: what the measured gradient and
the self-check cost in a whole run. Then one in-process breakdown of the
audit's own time by stage. weightwatcher is optional (put it on PYTHONPATH, see docs/benchmarks.md);
without it the second ratio is skipped. The model has random weights (weights=None): nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

FLOOR = (
    "import sys, torch, torchvision; "
    "program = torch.export.load(sys.argv[1]); "
    "norms = [torch.linalg.vector_norm(t.detach()) for t in program.state_dict.values() if t.is_floating_point()]"
)
PEER = (
    "import logging, torch, torchvision, weightwatcher; "
    "logging.getLogger('weightwatcher').setLevel(logging.ERROR); torch.manual_seed(0); "
    "weightwatcher.WeightWatcher(model=torchvision.models.resnet50(weights=None).eval()).analyze()"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cli_command(archive: Path) -> list[str]:
    script = Path(sys.executable).with_name("wssi-audit")
    if script.exists():
        return [str(script), str(archive)]
    found = shutil.which("wssi-audit")
    return [found, str(archive)] if found else [sys.executable, "-m", "wssi_audit", str(archive)]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"}, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return seconds


def has_weightwatcher() -> bool:
    return subprocess.run([sys.executable, "-c", "import weightwatcher"], capture_output=True).returncode == 0


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def breakdown(archive: Path) -> list[tuple[str, float]]:
    """Seconds per stage of one in-process audit of the archive (after a warm-up run)."""
    from wssi_audit.auditing import analyze_graph
    from wssi_audit.frontends import build_graph
    from wssi_audit.loading import load_model

    analyze_graph(build_graph(load_model(archive, for_analysis=True).model, None))  # warm-up
    stages = []
    start = time.perf_counter()
    loaded = load_model(archive, for_analysis=True)  # as the CLI loads it
    stages.append(("load (scan + pt2_reader)", time.perf_counter() - start))
    start = time.perf_counter()
    graph = build_graph(loaded.model, loaded.example_inputs)
    stages.append(("trace to the internal graph", time.perf_counter() - start))
    for name, verify, measure in (
        ("analysis (structure, norms, bounds)", False, False),
        ("analysis + self-check", True, False),
        ("analysis + self-check + measured gradient", True, True),
    ):
        graph = build_graph(loaded.model, loaded.example_inputs)
        start = time.perf_counter()
        analyze_graph(graph, verify=verify, measure=measure)
        stages.append((name, time.perf_counter() - start))
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of floor, CLI (and weightwatcher)")
    parser.add_argument("--input-size", type=int, default=224, help="spatial size of the 1x3xSxS example input")
    parser.add_argument("--variants", action="store_true", help="also time the CLI without measurement / self-check")
    args = parser.parse_args()

    import torch
    import torchvision

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, args.input_size, args.input_size)
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), torchvision {torchvision.__version__}, Python {platform.python_version()}"
    )
    print(f"model: torchvision resnet50, random init, input 1x3x{args.input_size}x{args.input_size}")
    peer = has_weightwatcher()
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "resnet50.pt2"
        torch.export.save(torch.export.export(model, (x,), strict=False), archive)
        commands = {
            "floor": [sys.executable, "-c", FLOOR, str(archive)],
            "cli": cli_command(archive),
        }
        if args.variants:
            commands["cli --no-measure"] = [*cli_command(archive), "--no-measure"]
            commands["cli --no-verify --no-measure"] = [*cli_command(archive), "--no-verify", "--no-measure"]
        if peer:
            commands["weightwatcher"] = [sys.executable, "-c", PEER]
        for command in commands.values():
            timed(command)  # warm-up: file caches, first-import compilation
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(timed(command))
        print(f"load average after:  {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        print()
        for name, values in times.items():
            print(f"{name:<30} seconds {summary(values)}")
        for name in (n for n in times if n.startswith("cli --")):
            ratios = [c / f for c, f in zip(times[name], times["floor"])]
            print(f"{name} / floor per round: {summary(ratios)}")
        cli_over_floor = [c / f for c, f in zip(times["cli"], times["floor"])]
        print(f"\nCLI / floor per round:          {summary(cli_over_floor)}   goal <= 1.3")
        if peer:
            peer_over_cli = [w / c for w, c in zip(times["weightwatcher"], times["cli"])]
            print(f"weightwatcher / CLI per round:  {summary(peer_over_cli)}   goal >= 2")
        else:
            print("weightwatcher not importable: its ratio is skipped")
        print("\nin-process breakdown of one audit:")
        for name, seconds in breakdown(archive):
            print(f"  {name:<44} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
