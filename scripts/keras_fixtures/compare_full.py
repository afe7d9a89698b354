"""Max |logit diff| between the Keras models of ``make_fixtures.py --size full`` and their
conversions (project environment, no TensorFlow)::

    python scripts/keras_fixtures/compare_full.py /tmp/keras_full
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from harmonizer_fast import models
from harmonizer_fast.models.keras_convert import KERAS_ARCHITECTURES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="output folder of make_fixtures.py --size full")
    args = parser.parse_args()
    print("| model | timm twin | max abs diff | max abs logit | relative |")
    print("| --- | --- | --- | --- | --- |")
    for name, architecture in KERAS_ARCHITECTURES.items():
        data = np.load(args.folder / f"{name}.npz")
        model = getattr(models, f"load_{name}")(weights=args.folder / f"{name}.h5")
        x = torch.from_numpy(data["images"].astype(np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            out = model(models.model_preprocess(model)(x)).numpy()
        diff, scale = float(np.abs(out - data["logits"]).max()), float(np.abs(data["logits"]).max())
        print(f"| {name} | `{architecture.timm_name}` | {diff:.2e} | {scale:.3g} | {diff / scale:.1e} |", flush=True)
        del model


if __name__ == "__main__":
    main()
