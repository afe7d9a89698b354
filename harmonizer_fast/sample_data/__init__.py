"""A small ClickMe-format sample bundled with the package (synthetic importance maps).

``train/train-0.tfrecords`` (30 records) and ``val/val-0.tfrecords`` (10 records): views
of five ``skimage.data`` photographs with hand-placed blob maps on their main objects,
written by :mod:`harmonizer_fast.sample_data.make_sample`. They are **not** human ClickMe
maps; they exercise the pipeline and show the harmonizer moving saliency onto a target.
"""
from pathlib import Path
from typing import List

SAMPLE_DIR = Path(__file__).resolve().parent


def sample_shards(split: str) -> List[Path]:
    """The bundled shard files of ``split`` (``"train"`` or ``"val"``)."""
    if split not in ("train", "val"):
        raise ValueError(f"`split` must be 'train' or 'val', got {split!r}")
    paths = sorted((SAMPLE_DIR / split).glob("*.tfrecords"))
    if not paths:
        raise FileNotFoundError(
            f"no sample shards in {SAMPLE_DIR / split}; run python -m harmonizer_fast.sample_data.make_sample"
        )
    return paths


__all__ = ["SAMPLE_DIR", "sample_shards"]
