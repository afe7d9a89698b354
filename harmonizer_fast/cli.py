"""The ``harmonizer-fast`` command: one subcommand per concern, registered in :data:`COMMANDS`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

#: subcommand -> module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
#: Modules are imported only when their subcommand runs, so the CLI starts fast.
COMMANDS = {
    "sweep": "harmonizer_fast.zoo.sweep_cli",
    "bench": "harmonizer_fast.bench_cli",
    "train": "harmonizer_fast.training.train_cli",
    "eval-clickme": "harmonizer_fast.evaluation.eval_cli",
    "convert-keras": "harmonizer_fast.models.convert_cli",
    "eval-imagenet": "harmonizer_fast.zoo.imagenet_cli",
}

_HELP = {
    "sweep": "score many models, every layer, on IT benchmarks into one resumable table (+ figures)",
    "bench": "run the benchmark comparisons of this source checkout (benchmarks/run_all.py; --quick, --only)",
    "train": "harmonized training of a timm model on ClickMe shards (resumable checkpoints, DDP via torchrun)",
    "eval-clickme": "ClickMe human alignment of a model: per-image scores (CSV), summary and a saliency figure",
    "convert-keras": "a published harmonized Keras .h5 model to timm weights (.safetensors) with equal logits",
    "eval-imagenet": "ImageNet top-1/top-5 on a local validation folder with the model's timm data config (CSV)",
}


#: errors about the user's input or machine (a bad path, shape, option value, a missing
#: optional package, an absent GPU): the command prints them as one line naming the problem
#: and exits non-zero; a deep traceback helps nobody who typed a wrong path. Set
#: HARMONIZER_FAST_TRACEBACK=1 to see the traceback instead.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError, FloatingPointError)
TRACEBACK_ENV = "HARMONIZER_FAST_TRACEBACK"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmonizer-fast", description="Fast PyTorch neural harmonizer.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=_HELP.get(name, ""), description=_HELP.get(name)))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one subcommand; an error in :data:`USER_ERRORS` becomes ``SystemExit`` with a one-line message."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command])
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        raise SystemExit(f"harmonizer-fast {args.command}: error: {type(err).__name__}: {err}\n"
                         f"(set {TRACEBACK_ENV}=1 to see the traceback)") from err


if __name__ == "__main__":
    sys.exit(main())
