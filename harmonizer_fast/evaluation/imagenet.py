r"""ImageNet top-1 / top-5 of a model on a local validation set, with the model's own preprocessing.

Two layouts of ``data_dir`` are read (nothing is downloaded):

* **class folders**, ``data_dir/<class>/<image>``: ``<class>`` is a WordNet id (``n01440764``;
  its index is its position in the sorted list of the 1,000 ILSVRC-2012 synsets, timm's
  ``ImageNetInfo``, so a folder holding only some classes still gets the right indices) or an
  integer class index (``data_dir/207/dog.jpg``, the layout of the trainer's image folders);
* **flat**, ``data_dir/ILSVRC2012_val_00000001.JPEG ...`` with a labels file (``labels=``, else
  the first of these found in ``data_dir`` or its parent):

  - ``ILSVRC2012_validation_ground_truth.txt`` (devkit): line *i* is the ILSVRC2012_ID of
    ``ILSVRC2012_val_<i>``; the IDs are mapped to WordNet ids with the devkit's ``meta.mat``
    (looked for next to the labels file, or ``meta=``), then to indices as above;
  - ``LOC_val_solution.csv`` (Kaggle): ``ImageId,PredictionString``, the first WordNet id of
    each prediction string is the label;
  - ``val.txt`` or any text file of ``<file name> <label>`` lines, the label an integer index
    (0-based, sorted-synset order) or a WordNet id.

Each image goes through the model's timm data config
(:func:`timm.data.resolve_model_data_config`: input size, resize by ``crop_pct``, centre crop,
interpolation, mean/std) and :func:`timm.data.create_transform` (eval mode), in a
``DataLoader`` with workers. ``limit=N`` scores N images spread evenly over the sorted list (so
every part of a class-folder tree is visited): a quick **estimate**, flagged as such.

.. math:: \text{top-}k = 100\,\frac{1}{n}\sum_i \mathbf 1\big[y_i \in \operatorname{topk}(f(x_i))\big]
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from scipy.io import loadmat
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config
from tqdm.auto import tqdm

from harmonizer_fast._io import atomic_write_text

__all__ = [
    "ACCURACY_COLUMNS",
    "IMAGE_EXTENSIONS",
    "ImageNetAccuracy",
    "ImageNetValidation",
    "evaluate_imagenet",
    "imagenet_samples",
    "imagenet_synsets",
    "read_accuracy_rows",
    "write_accuracy_csv",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File name endings read as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_LABEL_FILES = ("ILSVRC2012_validation_ground_truth.txt", "LOC_val_solution.csv", "val.txt")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")
_WNID = re.compile(r"^n\d{8}$")


def imagenet_synsets() -> List[str]:
    """The 1,000 ILSVRC-2012 WordNet ids in class-index order (sorted), from timm's ``ImageNetInfo``."""

    return list(ImageNetInfo().label_names())


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_index(name: str, synset_index: Mapping[str, int], where: str) -> int:
    if name.isdigit():
        return int(name)
    if name in synset_index:
        return synset_index[name]
    raise ValueError(f"{where}: class {name!r} is neither an integer index nor an ILSVRC-2012 WordNet id (n01440764 ...)")


def _devkit_ids_to_wnids(meta: Path) -> Dict[int, str]:
    """ILSVRC2012_ID -> WordNet id from the devkit's ``meta.mat`` (``synsets`` struct)."""

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}


def _read_labels(labels: Path, meta: Optional[Path], synset_index: Mapping[str, int]) -> Dict[str, int]:
    """Label per file stem (``ILSVRC2012_val_00000001``) or per val number (``#1``) from a labels file."""
    text = labels.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"labels file {labels} is empty")
    if lines[0].lower().startswith("imageid"):  # Kaggle LOC_val_solution.csv
        out = {}
        for record in csv.DictReader(io.StringIO(text)):
            tokens = (record.get("PredictionString") or "").split()
            if not tokens:
                raise ValueError(f"{labels}: no WordNet id for {record.get('ImageId')!r}")
            out[record["ImageId"]] = _class_index(tokens[0], synset_index, str(labels))
        return out
    if all(line.isdigit() for line in lines):  # devkit ground truth: one ILSVRC2012_ID per val number
        meta = meta or labels.with_name("meta.mat")
        if not meta.is_file():
            raise FileNotFoundError(
                f"{labels} holds devkit ILSVRC2012_IDs, which need the devkit's meta.mat to become class "
                f"indices; not found at {meta} (pass meta=...)"
            )
        wnids = _devkit_ids_to_wnids(meta)
        try:
            return {f"#{i}": synset_index[wnids[int(v)]] for i, v in enumerate(lines, start=1)}
        except KeyError as err:
            raise ValueError(f"{labels}: ILSVRC2012_ID or WordNet id {err} is not in {meta}'s 1,000 classes") from None
    out = {}
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{labels}:{number}: expected '<file name> <label>', got {line!r}")
        out[Path(parts[0]).stem] = _class_index(parts[1], synset_index, f"{labels}:{number}")
    return out


def imagenet_samples(data_dir: PathLike, labels: Optional[PathLike] = None,
                     meta: Optional[PathLike] = None) -> Tuple[List[Tuple[str, int]], str]:
    """``([(image path, class index), ...] sorted by path, layout)`` of a validation folder.

    ``layout`` is ``"class-folders"`` or ``"flat"`` (see the module docstring for both).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"`data_dir` {str(root)!r} is not a folder")
    synset_index = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    entries = sorted(root.iterdir())
    flat = [p for p in entries if _is_image(p)]
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if flat:
        if labels is None:
            found = [d / name for d in (root, root.parent) for name in _LABEL_FILES if (d / name).is_file()]
            if not found:
                raise FileNotFoundError(
                    f"{root} holds images directly (the flat ILSVRC2012 layout) but no labels file: pass "
                    f"labels=... (one of {', '.join(_LABEL_FILES)} or '<file> <label>' lines)"
                )
            labels = found[0]
        table = _read_labels(Path(labels), Path(meta) if meta else None, synset_index)
        samples, missing = [], []
        for path in flat:
            match = _VAL_NUMBER.search(path.stem)
            key = path.stem if path.stem in table else (f"#{int(match.group(1))}" if match else None)
            if key in table:
                samples.append((str(path), table[key]))
            else:
                missing.append(path.name)
        if missing:
            raise ValueError(f"{len(missing)} images of {root} have no label in {labels}, e.g. {missing[:3]}")
        return samples, "flat"
    samples = []
    for folder in folders:
        index = _class_index(folder.name, synset_index, str(folder))
        samples += [(str(p), index) for p in sorted(folder.iterdir()) if _is_image(p)]
    if not samples:
        raise ValueError(f"no images in {root}: expected <class>/<image> folders or ILSVRC2012_val_* files")
    return samples, "class-folders"


class ImageNetValidation(torch.utils.data.Dataset):
    """Map-style dataset of ``(transformed image, class index)`` for a ``DataLoader``."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


@dataclass
class ImageNetAccuracy:
    """Top-1 / top-5 (percent) on ``images`` of the ``total`` images found; ``estimate`` when
    ``images < total`` (a ``limit`` was given)."""

    top1: float
    top5: float
    images: int
    total: int
    layout: str
    data_config: Dict[str, object]

    @property
    def estimate(self) -> bool:
        return self.images < self.total

    def describe(self) -> str:
        what = (f"ESTIMATE from {self.images} of {self.total} images (--limit)" if self.estimate
                else f"all {self.total} images")
        return f"top-1 {self.top1:.2f} %, top-5 {self.top5:.2f} % ({what}, {self.layout} layout)"


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_imagenet(model: nn.Module, data_dir: PathLike, labels: Optional[PathLike] = None,
                      meta: Optional[PathLike] = None, batch_size: int = 64, num_workers: Optional[int] = None,
                      limit: Optional[int] = None, data_config: Optional[Mapping[str, object]] = None,
                      progress: bool = True) -> ImageNetAccuracy:
    """Top-1 and top-5 accuracy (percent) of ``model`` (eval mode, its own device) on ``data_dir``.

    Args:
        model: returns (N, classes) logits over the ImageNet class indices.
        data_dir, labels, meta: the validation set (layouts in the module docstring).
        batch_size: images per forward pass.
        num_workers: ``DataLoader`` workers decoding and transforming images (default: CPU count, at most 8).
        limit: score only this many images, spread evenly over the sorted list (an estimate).
        data_config: overrides of the model's timm data config (e.g. ``{"crop_pct": 1.0}``).
        progress: tqdm progress bar.
    """

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer or None, got {limit!r}")
    samples, layout = imagenet_samples(data_dir, labels, meta)
    total = len(samples)
    if limit is not None and limit < total:
        picks = np.unique(np.round(np.linspace(0, total - 1, limit)).astype(np.int64))
        samples = [samples[i] for i in picks]
    config = {**resolve_model_data_config(model), **dict(data_config or {})}
    transform = create_transform(**config, is_training=False)
    workers = min(os.cpu_count() or 1, 8) if num_workers is None else int(num_workers)
    loader = torch.utils.data.DataLoader(ImageNetValidation(samples, transform), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    hits1 = hits5 = 0
    try:
        for images, targets in tqdm(loader, desc="ImageNet validation", unit="batch", disable=not progress):
            logits = model(images.to(device))
            if logits.ndim != 2:
                raise ValueError(f"the model must return (N, classes) logits, got shape {tuple(logits.shape)}")
            if int(targets.max()) >= logits.shape[1]:
                raise ValueError(f"class index {int(targets.max())} is outside the model's {logits.shape[1]} outputs")
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
            match = top == targets[:, None]
            hits1 += int(match[:, 0].sum())
            hits5 += int(match.any(dim=1).sum())
    finally:
        model.train(was_training)
    n = len(samples)
    return ImageNetAccuracy(100.0 * hits1 / n, 100.0 * hits5 / n, n, total, layout,
                            {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()})


#: Columns of the accuracy CSV (``model`` and ``top1`` are what the sweep's ``--accuracy-csv`` reads).
ACCURACY_COLUMNS = ("model", "top1", "top5", "images", "total", "estimate", "data")


def write_accuracy_csv(results: Mapping[str, ImageNetAccuracy], path: PathLike, data_dir: PathLike = "",
                       overwrite: bool = False) -> None:
    """Write ``model,top1,top5,images,total,estimate,data`` rows atomically.

    An existing file is kept unless ``overwrite``; rows of other models in it are kept either way
    (the file can collect many models' accuracies), rows of the same model are replaced only
    with ``overwrite``.
    """
    path = Path(path)
    rows = read_accuracy_rows(path) if path.exists() else {}
    clash = sorted(set(rows) & set(results))
    if clash and not overwrite:
        raise FileExistsError(f"{path} already has accuracies of {clash}; pass overwrite=True (--overwrite) to replace them")
    for model, accuracy in results.items():
        rows[model] = {"model": model, "top1": repr(accuracy.top1), "top5": repr(accuracy.top5),
                       "images": str(accuracy.images), "total": str(accuracy.total),
                       "estimate": "true" if accuracy.estimate else "false", "data": str(data_dir)}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ACCURACY_COLUMNS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows[m] for m in sorted(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buffer.getvalue())


def read_accuracy_rows(path: PathLike) -> Dict[str, Dict[str, str]]:
    """Rows of an accuracy CSV by model (needs the columns ``model`` and ``top1``)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"model", "top1"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path} needs columns model, top1; has {reader.fieldnames}")
        rows = {r["model"]: r for r in reader}
    for model, row in rows.items():
        if not math.isfinite(float(row["top1"])):
            raise ValueError(f"{path}: top1 of {model!r} is {row['top1']}")
    return rows

