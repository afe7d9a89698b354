#!/usr/bin/env bash
# Set up everything, then run the main job on the bundled sample (2 CPU cores: a few minutes once set up):
#  1. fine-tune ImageNet-pretrained EfficientNet-Lite0 with the harmonizer on the bundled
#     ClickMe-format sample; report held-out saliency/map Spearman before and after, and its
#     ImageNet top-5 on natural photographs (outputs/demo/: alignment.png, curves.png, summary.json);
#  2. sweep EfficientNet-Lite0/1, an untrained Lite0 and the harmonized Lite0 over all layers on the
#     object-recognition IT benchmark (neurons read out from held-out Lite2) and on ClickMe alignment
#     (bundled sample), against ImageNet top-1 (outputs/sweep/: results.csv, models.csv, the
#     accuracy-vs-IT, accuracy-vs-alignment and alignment-vs-IT figures, per-layer curves, report.html).
# IMAGENET_DIR=/path/to/imagenet/val bash scripts/demo.sh  measures every swept model's top-1 there
# (IMAGENET_LIMIT=N for an estimate on N images); without it the harmonized model's top-1 is shown
# as not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m harmonizer_fast.demo --out outputs/demo "$@"
.venv/bin/python -m harmonizer_fast.zoo outputs/sweep --quick \
  --harmonized efficientnet_lite0_harmonized=outputs/demo/run/last.pt \
  ${IMAGENET_DIR:+--imagenet "$IMAGENET_DIR"} ${IMAGENET_LIMIT:+--imagenet-limit "$IMAGENET_LIMIT"}
