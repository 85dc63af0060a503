"""Reproduce the paper's claims on real data (issue #5); see docs/results.md.

.venv/bin/python benchmarks/experiment.py --quick      # smoke test, < 3 min, writes build/experiment-quick/
.venv/bin/python benchmarks/experiment.py              # default grid: 41 min measured on 2 busy CPU
                                                       # cores; writes docs/results.md, docs/results/
.venv/bin/python benchmarks/experiment.py --device cuda  # larger grid on a GPU
.venv/bin/python benchmarks/experiment.py --rebuild    # redo tables/plots of the last run, no training
.venv/bin/python benchmarks/experiment.py --add-equivariant  # only regime 2b, merged into the last run
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace

import torch

from wssi_audit.experiments import default_config, large_config, quick_config, run_experiments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny grid: a smoke test (< 3 minutes)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; cuda runs the larger grid")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: 2 on CPU, 4 on CUDA)")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--output", default=None, help="folder for raw JSON and plots")
    parser.add_argument("--markdown", default=None, help="Markdown file for the tables")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="no training: redo tables and plots from build/experiment-raw-<grid>.json and "
        "<output>/summary.json of an earlier run",
    )
    parser.add_argument(
        "--add-equivariant",
        action="store_true",
        help="run only regime 2b (equivariant learning rates) and merge it into the last run",
    )
    parser.add_argument(
        "--implementation",
        choices=("auto", "shared", "local"),
        default="auto",
        help="invariant penalty: wssi_audit.regularizer (shared) or the local reference",
    )
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; running on the CPU", file=sys.stderr)
        args.device = "cpu"
    if args.quick:
        config = replace(quick_config(), device=args.device)
    elif args.device != "cpu":
        config = large_config(args.device)
    else:
        config = default_config()
    overrides = {"workers": args.workers, "seeds": args.seeds, "output": args.output, "markdown": args.markdown}
    config = replace(
        config, implementation=args.implementation, **{k: v for k, v in overrides.items() if v is not None}
    )
    warnings.filterwarnings("ignore")
    if args.rebuild:
        from pathlib import Path

        from wssi_audit.experiments.report import rebuild

        rebuild(Path("build") / f"experiment-raw-{config.name}.json", Path(config.output) / "summary.json", config)
        print(f"rebuilt {config.markdown} and {config.output}/")
        return 0
    start = time.perf_counter()
    if args.add_equivariant:
        from wssi_audit.experiments.runner import add_equivariant_regime

        add_equivariant_regime(
            config, progress=lambda message: print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)
        )
        return 0
    run_experiments(
        config, progress=lambda message: print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)
    )
    print(f"wrote {config.markdown} and {config.output}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
