#!/usr/bin/env bash
# Set up everything, then run the main job on the bundled sample (2 CPU cores: about 10 minutes):
#  1. fine-tune ImageNet-pretrained EfficientNet-Lite0 with the harmonizer on the bundled
#     ClickMe-format sample; report held-out saliency/map Spearman before and after, and its
#     ImageNet top-5 on natural photographs (outputs/demo/: alignment.png, curves.png, summary.json);
#  2. sweep EfficientNet-Lite 0/1/2 and the harmonized Lite0 over all layers on the simulated
#     image-level IT benchmark (outputs/sweep/: results.csv, tradeoff and per-layer figures, report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m harmonizer_fast.demo --out outputs/demo "$@"
.venv/bin/python -m harmonizer_fast.zoo outputs/sweep --quick \
  --harmonized efficientnet_lite0_harmonized=outputs/demo/run/last.pt
