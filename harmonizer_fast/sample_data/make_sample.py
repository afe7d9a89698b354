"""Generate the bundled ClickMe-format sample (synthetic maps, not human ClickMe data).

Five natural photographs from ``skimage.data`` (a cat, an espresso cup, a rocket on its
launch pad, a motorcycle, a camera on a tripod), each with a hand-assigned ImageNet label
and an importance map made of hand-placed Gaussian blobs on its main object (the cat's
eyes and nose, the cup, the rocket's body, the motorcycle, the camera and tripod). Every
record is a random square crop (55-100 % of the short side) of one photograph, flipped
left-right half of the time, resized to 256x256 like ClickMe records; the map goes
through the same crop, flip and resize. Crops of the same photograph go to both splits, so
the validation records are held-out *views*, not unseen photographs.

Usage: ``python -m harmonizer_fast.sample_data.make_sample [--out DIR] [--seed 0] [--overwrite]``
(existing shards in ``--out`` are refused without ``--overwrite``).
The output is deterministic for a seed; the bundled shards were made with the defaults.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from harmonizer_fast.sample_data import SAMPLE_DIR
from harmonizer_fast.common import write_clickme_shard

RECORD_SIZE = 256


class Blob(NamedTuple):
    """An axis-aligned Gaussian in source-image pixels: centre, standard deviations, weight."""

    x: float
    y: float
    sx: float
    sy: float
    weight: float = 1.0


class SourceImage(NamedTuple):
    load: Callable[[], np.ndarray]
    label: int  # ImageNet class index
    blobs: Tuple[Blob, ...]


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2)


def _sources() -> Dict[str, SourceImage]:
    from skimage import data  # optional: scikit-image (the `test` extra), only to regenerate the sample

    return {
        "chelsea": SourceImage(data.chelsea, 285,  # Egyptian cat
                               (Blob(185, 135, 30, 25), Blob(315, 140, 30, 25), Blob(265, 220, 30, 25),
                                Blob(250, 170, 110, 100, 0.4))),
        "coffee": SourceImage(data.coffee, 967,  # espresso
                              (Blob(330, 105, 95, 65), Blob(340, 190, 70, 40, 0.6), Blob(480, 200, 40, 30, 0.4))),
        "rocket": SourceImage(data.rocket, 657,  # missile
                              (Blob(312, 270, 18, 95), Blob(312, 145, 14, 30, 0.8))),
        "motorcycle": SourceImage(lambda: data.stereo_motorcycle()[0], 665,  # moped
                                  (Blob(330, 300, 150, 70), Blob(150, 385, 55, 55, 0.7), Blob(565, 405, 55, 55, 0.7))),
        "camera": SourceImage(lambda: _gray_to_rgb(data.camera()), 872,  # tripod
                              (Blob(305, 390, 60, 105), Blob(295, 200, 40, 28, 0.8))),
    }


def blob_map(height: int, width: int, blobs: Sequence[Blob]) -> np.ndarray:
    """Sum of the weighted Gaussians on an (height, width) grid, scaled to a maximum of 1."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    total = np.zeros((height, width))
    for b in blobs:
        total += b.weight * np.exp(-0.5 * (((xx - b.x) / b.sx) ** 2 + ((yy - b.y) / b.sy) ** 2))
    return total / total.max()


def _crop_flip_resize(array: np.ndarray, top: int, left: int, side: int, flip: bool) -> np.ndarray:
    crop = array[top:top + side, left:left + side]
    if flip:
        crop = crop[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))
    tensor = tensor.permute(2, 0, 1)[None] if tensor.ndim == 3 else tensor[None, None]
    resized = F.interpolate(tensor, size=(RECORD_SIZE, RECORD_SIZE), mode="bilinear", align_corners=False, antialias=True)
    out = resized[0].permute(1, 2, 0) if array.ndim == 3 else resized[0, 0]
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def make_records(views_per_image: int, seed: int) -> List[Tuple[str, np.ndarray, np.ndarray, int]]:
    """(source name, 256x256x3 image, 256x256 map, label) for ``views_per_image`` views of each source."""
    rng = np.random.default_rng(seed)
    records = []
    for name, source in _sources().items():
        image = source.load()
        height, width = image.shape[:2]
        heat = (blob_map(height, width, source.blobs) * 255.0).astype(np.float32)
        main = source.blobs[0]
        for _ in range(views_per_image):
            while True:  # keep the main object: its first blob's centre at least 20 % inside the crop
                side = int(rng.uniform(0.55, 1.0) * min(height, width))
                top = int(rng.integers(0, height - side + 1))
                left = int(rng.integers(0, width - side + 1))
                margin = 0.2 * side
                if left + margin <= main.x <= left + side - margin and top + margin <= main.y <= top + side - margin:
                    break
            flip = bool(rng.random() < 0.5)
            records.append((name, _crop_flip_resize(image, top, left, side, flip),
                            _crop_flip_resize(heat, top, left, side, flip), source.label))
    return records


def write_sample(out_dir: Path = SAMPLE_DIR, train_views: int = 6, val_views: int = 2, seed: int = 0,
                 quality: int = 90, overwrite: bool = False) -> Dict[str, Path]:
    """Write ``out_dir/train/train-0.tfrecords`` and ``out_dir/val/val-0.tfrecords``.

    Existing shards raise ``FileExistsError`` (nothing is written) unless ``overwrite=True``.
    """
    if not overwrite:
        existing = [p for p in (Path(out_dir) / s / f"{s}-0.tfrecords" for s in ("train", "val")) if p.exists()]
        if existing:
            raise FileExistsError(f"{[str(p) for p in existing]} already exist; pass overwrite=True "
                                  "(--overwrite) to replace them")

    records = make_records(train_views + val_views, seed)
    per_source: Dict[str, list] = {}
    for record in records:
        per_source.setdefault(record[0], []).append(record)
    splits = {"train": [r for rs in per_source.values() for r in rs[:train_views]],
              "val": [r for rs in per_source.values() for r in rs[train_views:]]}
    written = {}
    for split, rows in splits.items():
        path = Path(out_dir) / split / f"{split}-0.tfrecords"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_clickme_shard(path, np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows]),
                            np.array([r[3] for r in rows], dtype=np.int64), quality=quality,
                            overwrite=overwrite)
        written[split] = path
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmonizer_fast.sample_data.make_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="output folder (train/ and val/ inside)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-views", type=int, default=6)
    parser.add_argument("--val-views", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    args = parser.parse_args(argv)
    try:
        written = write_sample(args.out, args.train_views, args.val_views, args.seed, overwrite=args.overwrite)
    except FileExistsError as error:
        parser.error(str(error))
    for split, path in written.items():
        print(f"{split}: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
