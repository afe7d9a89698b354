"""Layer features for scoring every layer of a model: time and peak memory of three strategies.

* ``per-layer passes`` (the reference's way): one pass over the images per layer, keeping that
  layer's full features; memory n x d_layer, L forward passes.
* ``one pass, exact``: every layer's full features from one pass (n x sum of d over layers).
* ``one pass, projected``: :func:`harmonizer_fast.neural.features.extract_layer_grams` with a
  seeded sparse projection to ``projection_dim``; memory n x (n + projection_dim) per layer.

Each variant runs in its own spawned process, so its peak RSS (``ru_maxrss``) is its own. Every
variant ends with the (n, n) Gram matrix of every layer, what the dual ridge readout needs.
Images are random, generated batch by batch (never all at once).

Target (documented in README ``## IT scoring``): all 12 blocks of ViT-B/16 on 3,200 images under
8 GiB. Run ``python -m benchmarks.compare_scoring --model vit_base_patch16_224 --images 3200``
on a machine with time for it; the default here is ViT-Tiny (same depth, 1/4 width).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import List, Optional, Tuple

from benchmarks._timing import Comparison, Timing, format_table, peak_rss_gib

BATCH = 32


def _images(n_images: int, side: int = 224):
    import torch

    generator = torch.Generator().manual_seed(0)
    for start in range(0, n_images, BATCH):
        yield torch.randn(min(BATCH, n_images - start), 3, side, side, generator=generator)


def _model(name: str):
    import timm
    import torch

    torch.set_num_threads(2)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    return model, list(range(len(model.blocks))) if hasattr(model, "blocks") else list(range(len(model.feature_info)))


def _variant(name: str, model_name: str, n_images: int, projection_dim: int, queue) -> None:

    from harmonizer_fast.neural.features import extract_layer_grams

    model, layers = _model(model_name)
    start = time.perf_counter()
    if name == "per-layer passes":
        for layer in layers:
            extract_layer_grams(model, _images(n_images), [layer], progress=False)
    elif name == "one pass, exact":
        extract_layer_grams(model, _images(n_images), layers, progress=False)
    else:
        extract_layer_grams(model, _images(n_images), layers, projection_dim=projection_dim, progress=False)
    seconds = time.perf_counter() - start
    queue.put((seconds, peak_rss_gib(), len(layers)))


def _run(name: str, model_name: str, n_images: int, projection_dim: int) -> Timing:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_variant, args=(name, model_name, n_images, projection_dim, queue))
    proc.start()
    seconds, rss, n_layers = queue.get()
    proc.join()
    return Timing(name, seconds, seconds, seconds, 1, {"peak RSS": f"{rss:.2f} GiB", "layers": str(n_layers)})


VARIANTS = ("per-layer passes", "one pass, exact", "one pass, projected")


def compare(quick: bool = True, model_name: str = "vit_tiny_patch16_224", n_images: Optional[int] = None,
            projection_dim: int = 4096, variants: Optional[List[str]] = None) -> Tuple[str, List[Comparison]]:
    """Quick: 32 images, all three variants. Full: 320 images, the two one-pass variants (the
    per-layer passes take L times the one-pass time)."""
    n = n_images or (32 if quick else 320)
    variants = list(variants or (VARIANTS if quick else VARIANTS[1:]))
    timings = [_run(v, model_name, n, projection_dim) for v in variants]
    note = f"{model_name}, {n} random 224x224 images, batch {BATCH}, every block, projection_dim {projection_dim}, one run each"
    title = "Scoring every layer: per-layer Grams (time; peak RSS of a fresh process)"
    return title, [Comparison(f"{model_name} x {n}", timings[0], timings[1:], note)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--projection-dim", type=int, default=4096)
    parser.add_argument("--variants", nargs="*", choices=VARIANTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    title, comps = compare(args.quick, args.model, args.images, args.projection_dim, args.variants)
    print(format_table(comps, title))


if __name__ == "__main__":
    main()
