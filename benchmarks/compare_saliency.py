"""Cost per image of the ClickMe benchmark's saliency: one image per pass vs batched passes.

The ``clickme`` sweep benchmark explains every validation image for its label with
:class:`harmonizer_fast.evaluation.Saliency` (one forward and one input-gradient backward per
batch). This times that on random 224 x 224 images and labels, per image, for each model, at
batch 1 (the baseline) and at the given batch sizes, plus the whole per-image cost of the
benchmark (saliency and the Spearman / Dice / IoU metrics) at the largest batch.

Usage::

    python -m benchmarks.compare_saliency [--models efficientnet_lite0 resnet50 ...] [--images 64]
        [--batch-sizes 8 32] [--threads N]
    python -m benchmarks.run_all --only saliency [--quick]
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from benchmarks._timing import Comparison, format_table, measure
from harmonizer_fast.evaluation import Saliency, alignment_metrics
from harmonizer_fast.models import create_model, model_preprocess


def _case(model_name: str, images: int, batch_sizes: Sequence[int], repeats: int) -> Comparison:
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    normalize = model_preprocess(model)
    x = normalize(torch.rand(images, 3, 224, 224) * 255)
    labels = torch.nn.functional.one_hot(torch.randint(0, 1000, (images,)), 1000)
    human = torch.rand(images, 224, 224)

    def per_image(timing):
        timing.extra["per image"] = f"{timing.median_s / images * 1e3:.1f} ms"
        return timing

    baseline = per_image(measure(lambda: Saliency(model, batch_size=1)(x, labels), repeats, name="batch 1"))
    candidates = [per_image(measure(lambda b=b: Saliency(model, batch_size=b)(x, labels), repeats, name=f"batch {b}"))
                  for b in batch_sizes]
    largest = max(batch_sizes)
    candidates.append(per_image(measure(
        lambda: alignment_metrics(Saliency(model, batch_size=largest)(x, labels), human), repeats,
        name=f"batch {largest} + Spearman/Dice/IoU")))
    return Comparison(f"{model_name}, {images} images 224 px", baseline, candidates,
                      note=f"torch threads {torch.get_num_threads()}")


def compare(quick: bool = False, models: Optional[Sequence[str]] = None, images: Optional[int] = None,
            batch_sizes: Sequence[int] = (8, 32)) -> Tuple[str, List[Comparison]]:
    models = list(models or (["efficientnet_lite0"] if quick else ["efficientnet_lite0", "resnet50",
                                                                   "vit_base_patch16_224"]))
    images = images or (16 if quick else 64)
    batch_sizes = [min(b, images) for b in batch_sizes]
    repeats = 2 if quick else 3
    return ("ClickMe saliency cost per image (one forward + input-gradient backward per batch)",
            [_case(m, images, batch_sizes, repeats) for m in models])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    title, comparisons = compare(args.quick, args.models, args.images, args.batch_sizes)
    print(format_table(comparisons, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
