"""Start-up cost of the package: ``harmonizer-fast --help`` and ``import`` of each room, in fresh interpreters.

Each figure is the median wall time of ``--repeats`` fresh ``python -c`` processes. ``--tree DIR``
(repeatable) measures other checkouts of the package (e.g. an older commit unpacked with
``git archive``) with the same interpreter, bypassing this checkout's editable install, so that
two trees compare like for like. ``--module NAME`` adds imports of third-party modules (what a
lazy import defers). Time it on a quiet machine (nothing else running).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

#: what each row runs, after the package's folder is put first on the path.
SNIPPETS = {
    "harmonizer-fast --help": "import harmonizer_fast.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass",
    "import harmonizer_fast.common": "import harmonizer_fast.common",
    "import harmonizer_fast.evaluation": "import harmonizer_fast.evaluation",
    "import harmonizer_fast.neural": "import harmonizer_fast.neural",
    "import harmonizer_fast.models": "import harmonizer_fast.models",
    "import harmonizer_fast.training": "import harmonizer_fast.training",
    "import harmonizer_fast.zoo": "import harmonizer_fast.zoo",
}

#: drops the editable install's import hook, so the tree given by the working directory is imported.
_BOOT = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
         "sys.path.insert(0, '.')\n")


def time_snippet(tree: Path, code: str, repeats: int) -> float:
    """Median seconds of ``repeats`` fresh interpreters running ``code`` against the package in ``tree``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _BOOT + code], cwd=tree, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="another checkout to measure (repeatable)")
    parser.add_argument("--module", action="append", default=[], help="a third-party module to time alone")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    trees = [REPO] + [Path(t).resolve() for t in args.tree]
    snippets: Dict[str, str] = dict(SNIPPETS)
    snippets.update({f"import {m} (alone)": f"import {m}" for m in args.module})
    print(f"median of {args.repeats} fresh interpreters, seconds; python {sys.version.split()[0]}")
    print("| what | " + " | ".join(str(t) for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for name, code in snippets.items():
        cells = [f"{time_snippet(tree, code, args.repeats):.2f}" for tree in trees]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
