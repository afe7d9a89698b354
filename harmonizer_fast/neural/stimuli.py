r"""Brain-Score stimulus sets and Brain-Score's stimulus pipeline, without Brain-Score.

**Stimulus sets.** brainio (Brain-Score 2.x) ships a stimulus set as a CSV, one row per stimulus,
with a ``stimulus_id`` column (``image_id`` in older sets), a ``filename`` column (the file's
path inside the zip or folder) and metadata columns such as ``object_name``, next to a zip of the
files (``stimulus_<identifier>.csv`` and ``stimulus_<identifier>.zip``).
:func:`load_stimulus_set` reads the CSV and finds the files in a folder or directly inside the zip.

**Pipeline** (:func:`brainscore_preprocess`), as brainscore-vision 2.4.2 gives a stimulus to a
model on a neural benchmark:

1. *Place on screen* (``benchmark_helpers/screen.py``): the stimulus spans ``stimulus_degrees``
   (the benchmark's, 8 for MajajHong2015) and the model sees ``model_degrees`` (8 by default).
   With the ratio :math:`\rho = \text{model} / \text{stimulus}`, the image of size
   :math:`(w, h)` becomes :math:`\text{round}(\rho\,(w, h))` (NumPy rounding, half to even): for
   :math:`\rho \ge 1` it is pasted at ``round((target - size) / 2)`` onto a grey (128, 128, 128)
   RGB canvas, for :math:`\rho < 1` cropped centrally from ``round((size - target) / 2)``. Brain-Score
   writes the converted image to a file of the original format before reading it again, so a
   JPEG stimulus is re-encoded (PIL's default quality); ``reencode=True`` does the same in memory.
   Equal degrees leave the file untouched.
2. *Load* (``model_helpers/activations/pytorch.py``, ``load_image``): images whose PIL mode holds
   ``L``, ``A`` or ``P`` (grey, alpha, palette) are pasted onto a black RGB canvas (the alpha
   channel is dropped, not composited); other modes are used as they are (converted to RGB here
   when they are not RGB, e.g. CMYK, where Brain-Score would fail).
3. *Resize* to ``(image_size, image_size)`` with PIL (torchvision's ``Resize`` on a PIL image;
   bilinear by default, Brain-Score's; a model's timm ``interpolation`` can be passed), no crop.
4. ``ToTensor`` (``/ 255``, float32) and ``Normalize(mean, std)`` with the model's own mean/std
   (Brain-Score's default is ImageNet's; :func:`preprocessing_from_data_config` reads a timm data
   config).
"""
from __future__ import annotations

import csv
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

__all__ = [
    "StimulusSet",
    "load_stimulus_set",
    "place_on_screen",
    "brainscore_load_image",
    "brainscore_preprocess",
    "preprocessing_from_data_config",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
]

#: Brain-Score's default normalisation (``torchvision_preprocess``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: PIL filters by the names timm data configs use.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
#: Brain-Score's screen background (PIL's colour name 'gray').
SCREEN_GREY = (128, 128, 128)
_ID_COLUMNS = ("stimulus_id", "image_id")


@dataclass
class StimulusSet:
    """A Brain-Score stimulus set: ids, file names inside ``source`` (a folder or a zip) and metadata.

    ``columns`` holds every CSV column as strings, by name (``object_name`` among them when the
    CSV has it).
    """

    stimulus_ids: np.ndarray
    filenames: List[str]
    source: Path
    columns: Dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._position = {str(s): i for i, s in enumerate(self.stimulus_ids.tolist())}
        self._zip_members: Optional[Dict[str, str]] = None

    def __len__(self) -> int:
        return len(self.stimulus_ids)

    def metadata(self, column: str, stimulus_ids: Sequence) -> np.ndarray:
        """Values of ``column`` for ``stimulus_ids`` (in that order)."""
        if column not in self.columns:
            raise KeyError(f"stimulus set {self.source} has no column {column!r} (columns: {sorted(self.columns)})")
        return self.columns[column][self.indices(stimulus_ids)]

    def indices(self, stimulus_ids: Sequence) -> np.ndarray:
        missing = [s for s in stimulus_ids if str(s) not in self._position]
        if missing:
            raise KeyError(f"{len(missing)} stimulus ids are not in the stimulus set of {self.source}, e.g. {missing[:3]}")
        return np.array([self._position[str(s)] for s in stimulus_ids], dtype=np.int64)

    def _read_bytes(self, filename: str) -> bytes:
        if self.source.is_dir():
            path = (self.source / filename).resolve()
            if self.source.resolve() not in path.parents:
                raise ValueError(f"stimulus file name {filename!r} points outside {self.source}")
            if not path.is_file():
                raise FileNotFoundError(f"stimulus {filename!r} not found in {self.source}")
            return path.read_bytes()
        with zipfile.ZipFile(self.source) as zf:
            if self._zip_members is None:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                members = {n: n for n in names}
                # Zips made with a top folder: fall back to a unique match of the path's tail.
                for n in names:
                    members.setdefault(PurePosixPath(n).name, n)
                self._zip_members = members
            member = self._zip_members.get(filename) or self._zip_members.get(PurePosixPath(filename).name)
            if member is None:
                raise FileNotFoundError(f"stimulus {filename!r} not found in {self.source}")
            return zf.read(member)

    def open(self, stimulus_id) -> Image.Image:
        """The stimulus file as a PIL image (loaded; the file is closed)."""
        filename = self.filenames[self.indices([stimulus_id])[0]]
        image = Image.open(io.BytesIO(self._read_bytes(filename)))
        image.load()
        return image


def load_stimulus_set(csv_path: Union[str, Path], stimuli: Union[str, Path, None] = None) -> StimulusSet:
    """Read a Brain-Score stimulus set CSV and locate its files.

    ``stimuli``: the folder or zip holding the files (``filename`` column, relative to it); by
    default the zip or folder next to the CSV with the same name
    (``stimulus_hvm_public.csv`` -> ``stimulus_hvm_public.zip`` or ``stimulus_hvm_public/``).
    Every listed file is checked to exist. An id listed twice raises ``ValueError``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"stimulus set CSV {csv_path} not found")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"stimulus set CSV {csv_path} has no rows")
    header = list(rows[0])
    id_column = next((c for c in _ID_COLUMNS if c in header), None)
    if id_column is None or "filename" not in header:
        raise ValueError(f"stimulus set CSV {csv_path} needs columns 'stimulus_id' (or 'image_id') and 'filename', got {header}")
    columns = {c: np.array([r[c] for r in rows], dtype=object) for c in header}
    ids = columns[id_column]
    columns.setdefault("stimulus_id", ids)
    unique, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"stimulus set CSV {csv_path} lists stimulus ids more than once: {unique[counts > 1][:5].tolist()}")
    if stimuli is None:
        candidates = [csv_path.with_suffix(".zip"), csv_path.with_suffix("")]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"no stimuli next to {csv_path}: expected {candidates[0]} or the folder {candidates[1]}")
        stimuli = found[0]
    stimuli = Path(stimuli)
    if not stimuli.exists():
        raise FileNotFoundError(f"stimuli {stimuli} not found")
    if stimuli.is_file() and not zipfile.is_zipfile(stimuli):
        raise ValueError(f"stimuli {stimuli} must be a folder or a zip file")
    filenames = [str(f) for f in columns["filename"]]
    stimulus_set = StimulusSet(ids, filenames, stimuli, columns)
    _check_files(stimulus_set)
    return stimulus_set


def _check_files(stimulus_set: StimulusSet) -> None:
    source = stimulus_set.source
    if source.is_dir():
        missing = [f for f in stimulus_set.filenames if not (source / f).is_file()]
    else:
        with zipfile.ZipFile(source) as zf:
            names = set(zf.namelist())
        tails = {PurePosixPath(n).name for n in names}
        missing = [f for f in stimulus_set.filenames if f not in names and PurePosixPath(f).name not in tails]
    if missing:
        raise FileNotFoundError(f"{len(missing)} stimulus files listed in the CSV are not in {source}, e.g. {missing[:3]}")


def _round_half_even(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).round().astype(int)


def place_on_screen(
    image: Image.Image,
    model_degrees: float = 8.0,
    stimulus_degrees: float = 8.0,
    reencode_format: Optional[str] = None,
) -> Image.Image:
    """Brain-Score's ``ImageConverter.apply_ratio``: pad onto grey or crop centrally (module docstring).

    ``reencode_format`` (e.g. ``'JPEG'``): save the converted image in that format and read it back,
    as Brain-Score does when it writes the converted stimulus to disk. Equal degrees return ``image``.
    """
    for name, value in (("model_degrees", model_degrees), ("stimulus_degrees", stimulus_degrees)):
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise ValueError(f"`{name}` must be a positive number of visual degrees, got {value!r}")
    if model_degrees == stimulus_degrees:
        return image
    ratio = model_degrees / stimulus_degrees
    size = np.array(image.size)
    target = _round_half_even(ratio * size)
    if ratio >= 1:
        canvas = Image.new("RGB", tuple(int(v) for v in target), SCREEN_GREY)
        canvas.paste(image, tuple(int(v) for v in _round_half_even((target - size) / 2)))
        converted = canvas
    else:
        left, upper = _round_half_even((size - target) / 2)
        right, lower = np.array([left, upper]) + target
        converted = image.crop((int(left), int(upper), int(right), int(lower)))
    if reencode_format:
        buffer = io.BytesIO()
        converted.save(buffer, format=reencode_format)
        converted = Image.open(io.BytesIO(buffer.getvalue()))
        converted.load()
    return converted


def brainscore_load_image(image: Image.Image) -> Image.Image:
    """RGB as Brain-Score's ``load_image``: grey, alpha and palette images are pasted on black RGB."""
    mode = image.mode.upper()
    if "L" in mode or "A" in mode or "P" in mode:
        rgb = Image.new("RGB", image.size)
        rgb.paste(image)
        return rgb
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_triplet(values: Sequence[float], name: str, positive: bool) -> Tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3 or not all(np.isfinite(values)) or (positive and min(values) <= 0):
        raise ValueError(f"`{name}` must be 3 finite{' positive' if positive else ''} numbers (one per RGB channel), got {values}")
    return values


def brainscore_preprocess(
    images: Iterable[Union[Image.Image, str, Path]],
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    model_degrees: float = 8.0,
    stimulus_degrees: float = 8.0,
    reencode: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """(N, 3, image_size, image_size) float32 model inputs from stimuli, as Brain-Score gives them.

    ``images``: PIL images or image file paths. See the module docstring for each step;
    ``reencode`` re-encodes converted stimuli in their file's format (``image.format``), as
    Brain-Score's screen conversion does.
    """
    if not (isinstance(image_size, (int, np.integer)) and image_size > 0):
        raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"`interpolation` must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    mean_t = torch.tensor(_check_triplet(mean, "mean", False), dtype=torch.float32).reshape(3, 1, 1)
    std_t = torch.tensor(_check_triplet(std, "std", True), dtype=torch.float32).reshape(3, 1, 1)
    out = []
    for item in tqdm(images, desc="stimuli", disable=not progress, leave=False):
        if isinstance(item, (str, Path)):
            with Image.open(item) as opened:
                opened.load()
                image = opened.copy()
                image.format = opened.format
        elif isinstance(item, Image.Image):
            image = item
        else:
            raise TypeError(f"`images` must hold PIL images or paths, got {type(item).__name__}")
        fmt = image.format if reencode else None
        placed = place_on_screen(image, model_degrees, stimulus_degrees, reencode_format=fmt)
        rgb = brainscore_load_image(placed).resize((image_size, image_size), INTERPOLATIONS[interpolation])
        pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)
        out.append((pixels.to(torch.float32).div(255) - mean_t) / std_t)
    if not out:
        raise ValueError("`images` is empty")
    return torch.stack(out)


def preprocessing_from_data_config(data_config: Mapping) -> Dict[str, object]:
    """``brainscore_preprocess`` keywords from a timm data config (``timm.data.resolve_data_config``):
    ``input_size`` (C, H, W; square), ``mean``, ``std``, ``interpolation``. The config's crop is
    not used: Brain-Score resizes the whole (placed) stimulus."""
    for key in ("input_size", "mean", "std"):
        if key not in data_config:
            raise KeyError(f"data config has no {key!r} (keys: {sorted(data_config)})")
    _, height, width = data_config["input_size"]
    if height != width:
        raise ValueError(f"Brain-Score resizes to a square input; data config input_size is {data_config['input_size']}")
    return {
        "image_size": int(height),
        "mean": tuple(data_config["mean"]),
        "std": tuple(data_config["std"]),
        "interpolation": str(data_config.get("interpolation", "bilinear")),
    }
