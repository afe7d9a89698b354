"""Arcaro et al. (2020) spatial IT recordings and stimuli (port of ``neural_harmonizer.data``).

Layout of the data folder (what the public ``Arcaro2020.zip`` unpacks to)::

    <root>/George/george_060118_data.mat    imageRF (x, y, time ms, channel, image), UniqueNames
    <root>/George/natural_test/<image files>
    <root>/Red/red_062419_data.mat
    <root>/Red/red_naturalface/<image files>

``UniqueNames`` is a MATLAB cell array of Windows paths; only the file name is used. George's
channels 0..32 are posterior IT, 33.. central IT; Red's are central IT.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import scipy.io
import torch
from PIL import Image

from harmonizer_fast.neural.metrics import resize_bilinear
from harmonizer_fast.spec import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["Neural_dataset", "download_arcaro2020", "default_data_root", "BUCKET_URL", "DATA_ENV_VAR", "STIMULI"]

BUCKET_URL = "https://storage.googleapis.com/serrelab-public/neural_recordings/Arcaro2020.zip"
#: Environment variable naming the data folder when no ``data_root`` is given.
DATA_ENV_VAR = "HARMONIZER_FAST_NEURAL_DATA"
IMAGE_SIZE = 224
_IMAGENET_MEAN = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)


@dataclass(frozen=True)
class _Monkey:
    mat: str
    image_dir: str


@dataclass(frozen=True)
class _Stimuli:
    monkey: str
    channels: slice


_MONKEYS = {
    "george": _Monkey("George/george_060118_data.mat", "George/natural_test"),
    "red": _Monkey("Red/red_062419_data.mat", "Red/red_naturalface"),
}
#: Recording sets by name: which monkey and which of its channels.
STIMULI: Dict[str, _Stimuli] = {
    "george_posterior_it": _Stimuli("george", slice(0, 33)),
    "george_central_it": _Stimuli("george", slice(33, None)),
    "red_central_it": _Stimuli("red", slice(None)),
}


def default_data_root() -> Path:
    """``$HARMONIZER_FAST_NEURAL_DATA`` if set, else ``~/.cache/harmonizer_fast/Arcaro2020``."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "harmonizer_fast" / "Arcaro2020"


def download_arcaro2020(data_root: Union[str, Path, None] = None, url: str = BUCKET_URL) -> Path:
    """Download and unpack the public recordings into ``data_root`` (for users; tests never call it).

    Skipped when both .mat files are already there. The archive is written to a temporary file and
    unpacked into a temporary folder next to ``data_root``, then moved into place, so an interrupted
    download leaves nothing half-written.
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    if all((root / m.mat).exists() for m in _MONKEYS.values()):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".arcaro_download_") as tmp:
        archive = Path(tmp) / "Arcaro2020.zip"
        urllib.request.urlretrieve(url, archive)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(tmp) / "unpacked")
        found = [p.parent.parent for p in (Path(tmp) / "unpacked").rglob(_MONKEYS["george"].mat.split("/")[-1])]
        if not found:
            raise RuntimeError(f"{url} did not contain {_MONKEYS['george'].mat}")
        if root.exists():
            shutil.rmtree(root)
        os.replace(found[0], root)
    return root


def _stimulus_path(image_dir: Path, recorded: str, mat_path: Path) -> Path:
    """The file in ``image_dir`` that a ``UniqueNames`` entry names.

    Entries are the recording machine's paths (Windows, e.g. ``C:\\...\\natural_test\\img.jpg``):
    only the file name is used, so an absolute path or ``..`` never leads outside ``image_dir``;
    an entry without a file name (``..``, ``.``, empty) or one whose file resolves outside
    (a symbolic link) raises ``ValueError``.
    """
    name = recorded.replace("\\", "/").rstrip("/").split("/")[-1]
    if name in ("", ".", ".."):
        raise ValueError(f"{mat_path}: UniqueNames entry {recorded!r} names no stimulus file")
    path = image_dir / name
    root = image_dir.resolve()
    if path.exists() and root not in path.resolve().parents:
        raise ValueError(f"{mat_path}: UniqueNames entry {recorded!r} resolves to {path.resolve()}, outside {root}")
    return path


def _load_image(path: Path) -> torch.Tensor:
    """RGB image resized (bilinear, half-pixel centres, no antialias, like cv2.INTER_LINEAR) to 224x224,
    as a (3, 224, 224) uint8 tensor."""
    with Image.open(path) as img:
        rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy())
    resized = resize_bilinear(rgb.permute(2, 0, 1)[None], (IMAGE_SIZE, IMAGE_SIZE))[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


class Neural_dataset:
    """The Arcaro (2020) recordings read from a local folder (``data_root``, ``$HARMONIZER_FAST_NEURAL_DATA``
    or ``~/.cache/harmonizer_fast/Arcaro2020``).

    Unlike the reference, constructing it downloads nothing (see :func:`download_arcaro2020`);
    missing files raise ``FileNotFoundError`` saying where they were expected. Images are
    returned NCHW.
    """

    def __init__(self, data_root: Union[str, Path, None] = None):
        self.data_root = Path(data_root) if data_root is not None else default_data_root()
        self._recordings: Dict[str, np.ndarray] = {}
        self._files: Dict[str, List[Path]] = {}

    def _require(self, path: Path) -> Path:
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found. Put the Arcaro (2020) data in {self.data_root} (George/, Red/), pass "
                f"data_root=..., set ${DATA_ENV_VAR}, or call harmonizer_fast.neural.data.download_arcaro2020()."
            )
        return path

    def _load_monkey(self, monkey: str) -> None:
        if monkey in self._recordings:
            return
        spec = _MONKEYS[monkey]
        mat_path = self._require(self.data_root / spec.mat)
        try:
            mat = scipy.io.loadmat(mat_path)
        except (OSError, ValueError, IndexError, EOFError, scipy.io.matlab.MatReadError) as err:
            # scipy reports a cut-off file as "could not read bytes", an IndexError or MatReadError.
            raise ValueError(f"{mat_path} is not a readable MATLAB file (truncated or corrupt?): {err}") from err
        for key in ("imageRF", "UniqueNames"):
            if key not in mat:
                raise KeyError(f"{self.data_root / spec.mat} has no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
        image_rf = mat["imageRF"]
        if image_rf.ndim != 5:
            raise ValueError(f"imageRF must be (x, y, time, channel, image), got shape {image_rf.shape}")
        names = mat["UniqueNames"].ravel()
        if names.size < image_rf.shape[-1]:
            raise ValueError(f"UniqueNames has {names.size} entries for {image_rf.shape[-1]} images")
        # Images first: (image, x, y, time, channel).
        self._recordings[monkey] = np.transpose(image_rf, (4, 0, 1, 2, 3))
        image_dir = self.data_root / spec.image_dir
        self._files[monkey] = [
            self._require(_stimulus_path(image_dir, str(np.asarray(names[i]).ravel()[0]), mat_path))
            for i in range(image_rf.shape[-1])
        ]

    def raw_recordings(self, stimuli: str = "george_central_it") -> np.ndarray:
        """The (images, x, y, time, channels) recordings of one stimulus set (no flip, no time mean)."""
        spec = self._stimuli(stimuli)
        self._load_monkey(spec.monkey)
        return self._recordings[spec.monkey][..., spec.channels]

    def responses(self, stimuli: str = "george_central_it", a: int = 50, b: int = 90) -> torch.Tensor:
        """(images, x, y, channels) mean response over time samples ``[a, b)`` ms, both spatial axes reversed."""
        raw = self.raw_recordings(stimuli)
        if not 0 <= a < b <= raw.shape[3]:
            raise ValueError(f"need 0 <= time_a < time_b <= {raw.shape[3]} (recorded ms), got {a}, {b}")
        return torch.from_numpy(np.ascontiguousarray(raw[:, ::-1, ::-1, a:b].mean(axis=3)))

    @property
    def george_posterior_it(self) -> np.ndarray:
        """Raw (images, x, y, time, channels) recordings, as the reference's attribute of that name."""
        return self.raw_recordings("george_posterior_it")

    @property
    def george_central_it(self) -> np.ndarray:
        return self.raw_recordings("george_central_it")

    @property
    def red_central_it(self) -> np.ndarray:
        return self.raw_recordings("red_central_it")

    def get_george_posterior_it_temp(self, a: int = 50, b: int = 90) -> torch.Tensor:
        return self.responses("george_posterior_it", a, b)

    def get_george_central_it_temp(self, a: int = 50, b: int = 90) -> torch.Tensor:
        return self.responses("george_central_it", a, b)

    def get_red_central_it_temp(self, a: int = 50, b: int = 90) -> torch.Tensor:
        return self.responses("red_central_it", a, b)

    @staticmethod
    def _stimuli(stimuli: str) -> _Stimuli:
        if stimuli not in STIMULI:
            raise ValueError(f"`stimuli` must be one of {sorted(STIMULI)}, got {stimuli!r}")
        return STIMULI[stimuli]

    def stimuli_images(self, stimuli: str = "george_central_it") -> torch.Tensor:
        """(images, 3, 224, 224) uint8 stimuli of one recording set, in recording order."""
        monkey = self._stimuli(stimuli).monkey
        self._load_monkey(monkey)
        return torch.stack([_load_image(p) for p in self._files[monkey]])

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` with the ImageNet mean and std.

        The reference divided by the mean instead of the std (a bug, fixed).
        """
        return (images.to(torch.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD

    def load_data(
        self, stimuli: str = "george_central_it", time_a: int = 50, time_b: int = 90
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stimuli and responses of one recording set.

        Returns ``X`` (images, 3, 224, 224) uint8, ``X_preprocessed`` (same, float32, ImageNet
        normalised) and ``y`` (images, x, y, channels): the mean over ``[time_a, time_b)`` ms,
        images first, both spatial axes reversed (so the map is oriented like the image).
        """
        y = self.responses(stimuli, time_a, time_b)
        x = self.stimuli_images(stimuli)
        self.X, self.X_preprocessed, self.y = x, self.preprocess(x), y
        return self.X, self.X_preprocessed, self.y
