"""Model-zoo sweep throughput on this CPU: one streaming pass for all layers, and readout share.

For each small timm model (random weights, 64-pixel stimuli) on the simulated image-level
benchmark (3,200 images, 168 sites; ``quick``: 800):

* **extraction, one pass per layer** (baseline) vs **one pass for all layers** (the sweep's
  streaming pass), both over the same first 320 images, same accumulators;
* **whole sweep unit**: extraction of all images (at the stored 64 px) plus every layer's
  readouts (PLS-25 on the full features, through their exact n x n embedding when wider; the
  default PCA-1000 layer choice), with the throughput in
  model-layers scored per minute, the readouts' time relative to extraction, and the peak RSS.
"""
from __future__ import annotations

import time
from typing import List, Tuple

import torch

from benchmarks._timing import Comparison, Timing, measure, peak_rss_gib
from harmonizer_fast.models import model_preprocess
from harmonizer_fast.zoo.benchmarks import get_benchmark
from harmonizer_fast.zoo.layers import LayerExtractor
from harmonizer_fast.zoo.sweep import ModelSpec, SweepUnit, build_model, run_unit

MODELS = ("resnet18", "efficientnet_lite0", "convnext_atto")
BATCH = 64
SUBSET = 320


def _extract(model, layers, images, normalize) -> None:
    """Stream ``images`` through ``model`` once, feeding ``layers``' projection accumulators."""
    from harmonizer_fast.neural.features import LayerFeatureAccumulator

    extractor = LayerExtractor(model, layers)
    accumulators = [LayerFeatureAccumulator(256, "sparse", i) for i in range(len(layers))]
    for start in range(0, images.shape[0], BATCH):
        outputs = extractor(normalize(images[start:start + BATCH].float()))
        for acc, out in zip(accumulators, outputs.values()):
            acc.update(out)


def compare(quick: bool = False) -> Tuple[str, List[Comparison]]:
    n_images = 800 if quick else 3200
    options = {"n_images": n_images, "n_neuroids": 168, "image_size": 64, "seed": 0}
    benchmark = get_benchmark("image-level-sim", **options)
    subset = benchmark.images[:SUBSET]
    comparisons = []
    for name in MODELS:
        unit = SweepUnit(model=ModelSpec(name, name), benchmark="image-level-sim",
                         benchmark_options=tuple(sorted(options.items())), batch_size=BATCH, image_size=64)
        model = build_model(unit.model, unit.model_seed())
        normalize = model_preprocess(model)
        layers = LayerExtractor(model).layers
        with torch.no_grad():
            per_layer = measure(lambda: [_extract(model, [ly], subset, normalize) for ly in layers],
                                repeats=3, warmup=1, name=f"extraction, {len(layers)} passes ({SUBSET} img)")
            one_pass = measure(lambda: _extract(model, layers, subset, normalize),
                               repeats=3, warmup=1, name=f"extraction, 1 pass ({SUBSET} img)")
        start = time.perf_counter()
        rows = run_unit(unit)
        total = time.perf_counter() - start
        extraction = rows[0].extraction_s
        readouts = sum(r.readout_s for r in rows)
        whole = Timing(f"whole unit ({n_images} img, {len(rows)} layers)", total, total, total, 1, extra={
            "model-layers/min": f"{len(rows) / (total / 60):.2f}",
            "extraction": f"{extraction:.1f} s",
            "readouts": f"{readouts:.1f} s",
            "readouts/extraction": f"{readouts / extraction:.2f}",
            "peak RSS": f"{peak_rss_gib():.2f} GiB",
        })
        comparisons.append(Comparison(name, per_layer, [one_pass, whole],
                                      note=f"{len(layers)} layers, 64 px, threads {torch.get_num_threads()}"))
    return f"Model-zoo sweep (image-level-sim, {n_images} images, 168 sites)", comparisons
