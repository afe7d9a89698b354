"""``harmonizer-fast bench``: run the benchmark comparisons of a source checkout.

The benchmarks live in ``benchmarks/`` next to the package in the repository (they are
not installed with the wheel), so this command works from a source checkout (an
editable install or a clone on ``PYTHONPATH``) and says so otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional


def source_checkout() -> Path:
    """The repository root holding ``benchmarks/run_all.py`` next to this package.

    Raises:
        FileNotFoundError: the package was installed from a wheel (no ``benchmarks/``).
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run_all.py").is_file() or not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"`harmonizer-fast bench` needs a source checkout: no benchmarks/run_all.py next to the package "
            f"in {root}. Clone the repository and install it with `pip install -e .`, then run it again."
        )
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these comparisons (names of benchmarks/run_all.py COMPARISONS, e.g. ops)")


def command(args: argparse.Namespace) -> List[str]:
    """The ``python -m benchmarks.run_all ...`` command line for ``args``."""
    cmd = [sys.executable, "-m", "benchmarks.run_all"]
    if args.quick:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", *args.only]
    return cmd


def run(args: argparse.Namespace, root: Optional[Path] = None) -> int:
    try:
        root = root or source_checkout()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return subprocess.call(command(args), cwd=root, env=env)
