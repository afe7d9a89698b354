"""Print the ratio tables of every benchmark comparison, measured in this one run.

Usage: ``python -m benchmarks.run_all [--quick] [--only NAME ...]``. Each module listed in
:data:`COMPARISONS` exposes ``compare(quick: bool) -> (title, list[Comparison])``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
from typing import List, Optional

from benchmarks._timing import format_table

#: name -> module under benchmarks/ providing ``compare(quick)``.
COMPARISONS = {
    "clickme": "benchmarks.compare_clickme",
    "saliency": "benchmarks.compare_saliency",
    "sweep": "benchmarks.compare_sweep",
    "metrics": "benchmarks.compare_metrics",
    "loss": "benchmarks.compare_loss",
    "scoring": "benchmarks.compare_scoring",
    "readouts": "benchmarks.compare_readouts",
    "ops": "benchmarks.compare_ops",
    "train_step": "benchmarks.compare_train_step",
    "train_overhead": "benchmarks.compare_train_overhead",
    "attention_layer": "benchmarks.compare_attention_layer",
}


def machine_line() -> str:
    import torch

    return (
        f"{datetime.date.today().isoformat()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs | torch {torch.__version__} | threads {torch.get_num_threads()}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", nargs="*", choices=sorted(COMPARISONS), help="run only these")
    args = parser.parse_args(argv)
    names = args.only or list(COMPARISONS)
    print(f"# harmonizer_fast benchmarks\n\n{machine_line()}\n")
    for name in names:
        module = importlib.import_module(COMPARISONS[name])
        title, comparisons = module.compare(quick=args.quick)
        print(format_table(comparisons, title), "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
