"""ClickMe TFRecord shards in PyTorch, as ``harmonization.common.clickme_dataset``.

A record is a ``tf.train.Example`` with the features ``image`` (JPEG bytes, 256x256 RGB),
``heatmap`` (JPEG bytes, 256x256 grayscale human importance map) and ``label`` (int64,
ImageNet class), and optionally ``tokens`` (one float: the weight of the heatmap in the
harmonization loss; 1 when absent). Parsing follows the reference:

* image: decoded as TensorFlow's ``decode_jpeg`` does by default (libjpeg-turbo, integer-fast
  IDCT, smooth chroma upsampling; through ``simplejpeg``, see :data:`JPEG_DECODERS`),
  float32 0..255, resized bilinear to 224x224, **not** normalised (apply
  :func:`~harmonizer_fast.common.preprocess_input` in the model);
* heatmap: decoded, resized bilinear to 64x64, blurred with ``gaussian_kernel()``
  (:func:`~harmonizer_fast.common.gaussian_blur`), resized bilinear to 224x224;
* label: one-hot over 1000 classes (float32).

Bilinear resizing is TensorFlow 2's ``tf.image.resize`` (half-pixel centres, no
antialiasing), i.e. ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``.

**Batch structure** (what :func:`load_clickme` yields):

=========== ==================== ========= ==============================================
 item        shape                dtype     content
=========== ==================== ========= ==============================================
 images      (B, 3, 224, 224)     float32   RGB, 0..255, NCHW (the reference is NHWC)
 heatmaps    (B, 224, 224)        float32   blurred ClickMe maps (reference: (B, 224, 224, 1))
 labels      (B, 1000)            float32   one-hot
 tokens      (B,)                 float32   only with ``with_tokens=True``: heatmap weights
=========== ==================== ========= ==============================================

Differences from the reference, on purpose: records are read shard after shard in the
order given (the reference interleaves shards with an autotuned cycle length, so its
order depends on the machine); a label outside ``[0, num_classes)`` raises instead of
giving an all-zero row; images of any size are accepted (the reference requires 256x256).
"""
from __future__ import annotations

import io
import os
import re
import urllib.request
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harmonizer_fast.common.blur import gaussian_blur, gaussian_kernel
from harmonizer_fast.common.example import Feature, decode_example, encode_example
from harmonizer_fast.common.tfrecord import (
    TFRecordError,
    TFRecordWriter,
    index_tfrecord,
    iter_records,
    read_record_at,
    read_tfrecord,
)

PathLike = Union[str, "os.PathLike[str]"]

CLICKME_BASE_URL = "https://storage.googleapis.com/serrelab/prj_harmonization/dataset/click-me"
NB_TRAIN_SHARDS = 318
NB_VAL_SHARDS = 17
NUM_CLASSES = 1000
IMAGE_SIZE = 224
HEATMAP_BLUR_SIZE = 64
DEFAULT_CLICKME_DIR = Path("~/.keras/datasets/click-me")  # where the reference's get_file puts shards

#: shard file names of each split: the bucket's names, then the reference's Keras cache names.
SHARD_PATTERNS = {
    "train": ("train-*.tfrecords", "clickme_train_*"),
    "val": ("val-*.tfrecords", "clickme_val_*"),
    None: ("*.tfrecords", "*.tfrecord", "clickme_*"),
}



class ClickMeBatch(NamedTuple):
    """A parsed batch with heatmap weights (field names shared with the trainer's ``Batch``)."""

    images: torch.Tensor
    heatmaps: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor


GAUSSIAN_KERNEL = gaussian_kernel()  # (10, 10), sigma 10, as the reference's module constant


# ----------------------------------------------------------------------------- parsing
#: JPEG header colour spaces accepted for each decoded mode (TF keeps the file's channel count).
_JPEG_COLORSPACES = {"RGB": ("YCbCr", "RGB"), "L": ("Gray",)}


def _decode_simplejpeg(data: bytes, mode: str, what: str) -> np.ndarray:
    """TensorFlow's ``decode_jpeg`` defaults: integer-fast IDCT, fancy (smooth) chroma upsampling."""
    import simplejpeg

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError as exc:
        raise ValueError(f"`{what}` is not a readable JPEG ({exc})") from exc
    if colorspace not in _JPEG_COLORSPACES[mode]:
        raise ValueError(f"`{what}` must be a {mode} JPEG, got colour space {colorspace}")
    return simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB", fastdct=True,
                                  fastupsample=False)


def _decode_pil(data: bytes, mode: str, what: str) -> np.ndarray:
    """PIL's defaults (accurate IDCT): up to a few grey levels off TensorFlow's decoding."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG":
            raise ValueError(f"`{what}` is not a JPEG (PIL sees {image.format})")
        if image.mode != mode:
            raise ValueError(f"`{what}` must be a {mode} JPEG, got mode {image.mode}")
        array = np.array(image)  # writable copy (torch.from_numpy needs one)
    return array[:, :, None] if array.ndim == 2 else array


#: JPEG decoders, best first: ``simplejpeg`` (libjpeg-turbo with TensorFlow's default
#: flags, so decoded pixels match ``tf.io.decode_jpeg``) and PIL (fallback).
JPEG_DECODERS = {"simplejpeg": _decode_simplejpeg, "pil": _decode_pil}


def jpeg_backend() -> str:
    """Name of the JPEG decoder in use: ``"simplejpeg"`` when installed, else ``"pil"`` (warns once)."""
    global _JPEG_BACKEND
    if _JPEG_BACKEND is None:
        try:
            import simplejpeg  # noqa: F401

            _JPEG_BACKEND = "simplejpeg"
        except ImportError:
            _JPEG_BACKEND = "pil"
            warnings.warn(
                "simplejpeg is not installed: ClickMe JPEGs are decoded by PIL (accurate IDCT), which "
                "differs from TensorFlow's default fast IDCT by a few grey levels; `pip install simplejpeg` "
                "to reproduce the reference pixels",
                RuntimeWarning,
                stacklevel=2,
            )
    return _JPEG_BACKEND


_JPEG_BACKEND: Optional[str] = None


def _decode_jpeg(data: bytes, mode: str, what: str) -> np.ndarray:
    """Decode to (H, W, C) uint8 with C = 3 for ``mode="RGB"``, 1 for ``"L"``."""
    return JPEG_DECODERS[jpeg_backend()](data, mode, what)


def _single_value(features: Dict[str, Feature], name: str, kinds: Tuple[str, ...]):
    feature = features.get(name)
    if feature is None or feature.kind not in kinds or len(feature.values) != 1:
        got = "missing" if feature is None else f"{feature.kind} with {len(feature.values)} values"
        raise ValueError(f"ClickMe record: feature {name!r} must hold exactly one {' or '.join(kinds)} value, got {got}")
    return feature.values[0]


def decode_clickme_example(record: bytes) -> Tuple[np.ndarray, np.ndarray, int, float]:
    """Decode one serialized record without resizing.

    Returns:
        ``(image, heatmap, label, token)``: (H, W, 3) uint8 RGB, (H, W) uint8 heatmap, the
        class index and the heatmap weight (the ``tokens`` feature, 1.0 when absent).
    """
    features = decode_example(record)
    image = _decode_jpeg(_single_value(features, "image", ("bytes_list",)), "RGB", "image")
    heatmap = _decode_jpeg(_single_value(features, "heatmap", ("bytes_list",)), "L", "heatmap")[:, :, 0]
    label = int(_single_value(features, "label", ("int64_list",)))
    token = float(_single_value(features, "tokens", ("float_list", "int64_list"))) if "tokens" in features else 1.0
    return image, heatmap, label, token


def _bilinear(maps: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 2 ``tf.image.resize(..., "bilinear")`` of (N, C, H, W) maps to ``size``x``size``.

    Each plane is resized as its own (1, H, W) map: PyTorch's multi-channel CPU kernel
    rounds differently with the thread count and the batch size, which would make batches
    depend on ``num_workers``; the single-plane kernel gives the same bits either way.
    """
    batch, channels, height, width = maps.shape
    planes = maps.reshape(batch * channels, 1, height, width)
    resized = F.interpolate(planes, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return resized.reshape(batch, channels, size, size)


def _stack_nchw(arrays: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """(H, W, C) uint8 arrays as one float32 (N, C, H, W) tensor.

    Arrays of different sizes are first resized to ``size`` (the size the caller resizes
    the batch to next, so each goes through exactly one bilinear resize either way).
    """
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()[None] for a in arrays]
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.cat(tensors)
    return torch.cat([_bilinear(t, size) for t in tensors])


def clickme_heatmap_transform(heatmaps: torch.Tensor, kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference ClickMe heatmap processing: resize to 64x64, Gaussian blur, resize to 224x224.

    Args:
        heatmaps: (N, H, W) float maps (0..255 for decoded JPEGs).
        kernel: blur kernel, default ``gaussian_kernel()`` (10x10, sigma 10).

    Returns:
        (N, 224, 224) maps of the input's dtype.
    """
    kernel = GAUSSIAN_KERNEL if kernel is None else kernel
    small = _bilinear(heatmaps[:, None], HEATMAP_BLUR_SIZE)[:, 0]
    return _bilinear(gaussian_blur(small, kernel)[:, None], IMAGE_SIZE)[:, 0]


def parse_clickme_records(records: Sequence[bytes], with_tokens: bool = False,
                          num_classes: int = NUM_CLASSES) -> Tuple[torch.Tensor, ...]:
    """Parse serialized ClickMe records into one batch (see the module docstring for the layout).

    Args:
        records: serialized ``tf.train.Example`` records.
        with_tokens: also return the (B,) heatmap weights.
        num_classes: length of the one-hot label rows.

    Returns:
        ``(images, heatmaps, labels)``, or a :class:`ClickMeBatch` ``(images, heatmaps, labels,
        tokens)`` with ``with_tokens=True``.
    """
    if len(records) == 0:
        raise ValueError("`records` is empty")
    decoded = [decode_clickme_example(record) for record in records]
    labels = torch.tensor([item[2] for item in decoded], dtype=torch.int64)
    bad = [(i, int(v)) for i, v in enumerate(labels) if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"ClickMe label out of range [0, {num_classes}): (batch position, label) {bad[:5]}")
    images = _bilinear(_stack_nchw([item[0] for item in decoded], IMAGE_SIZE), IMAGE_SIZE)
    heatmaps = clickme_heatmap_transform(_stack_nchw([item[1][:, :, None] for item in decoded], HEATMAP_BLUR_SIZE)[:, 0])
    one_hot = F.one_hot(labels, num_classes).to(torch.float32)
    if not with_tokens:
        return images, heatmaps, one_hot
    return ClickMeBatch(images, heatmaps, one_hot, torch.tensor([item[3] for item in decoded], dtype=torch.float32))


def parse_clickme_record(record: bytes, with_tokens: bool = False,
                         num_classes: int = NUM_CLASSES) -> Tuple[torch.Tensor, ...]:
    """Parse one serialized ClickMe record (``parse_clickme_prototype`` in the reference).

    Returns:
        ``image`` (3, 224, 224) float32 0..255, ``heatmap`` (224, 224) float32, ``label``
        (num_classes,) float32 one-hot, and ``token`` () float32 with ``with_tokens=True``.
    """
    return tuple(item[0] for item in parse_clickme_records([record], with_tokens, num_classes))


# ----------------------------------------------------------------------------- writing
def _as_uint8_array(x, name: str, ndim: Tuple[int, ...], layout: str) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.dtype != np.uint8:
        raise TypeError(f"`{name}` must be uint8 (0..255 pixel values), got dtype {array.dtype}")
    if array.ndim not in ndim:
        raise ValueError(f"`{name}` must have shape {layout}, got {tuple(array.shape)}")
    return array


def encode_clickme_example(image: np.ndarray, heatmap: np.ndarray, label: int, token: Optional[float] = None,
                           quality: int = 95) -> bytes:
    """Serialize one ClickMe record: (H, W, 3) uint8 image and (H, W) uint8 heatmap as JPEG."""
    from PIL import Image

    def jpeg(array: np.ndarray, mode: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array, mode).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    features = {"image": jpeg(image, "RGB"), "heatmap": jpeg(heatmap, "L"), "label": Feature("int64_list", (int(label),))}
    if token is not None:
        features["tokens"] = Feature("float_list", (float(token),))
    return encode_example(features)


def write_clickme_shard(path: PathLike, images, heatmaps, labels, tokens=None, quality: int = 95) -> int:
    """Write a ClickMe TFRecord shard (atomically) from uint8 arrays.

    Args:
        path: output file.
        images: (N, H, W, 3) uint8 RGB (the storage layout of JPEG; ClickMe uses 256x256).
        heatmaps: (N, H, W) or (N, H, W, 1) uint8.
        labels: (N,) ints in [0, 1000).
        tokens: optional (N,) floats, written as the ``tokens`` feature.
        quality: JPEG quality (PIL).

    Returns:
        the number of records written.
    """
    images = _as_uint8_array(images, "images", (4,), "(N, H, W, 3)")
    heatmaps = _as_uint8_array(heatmaps, "heatmaps", (3, 4), "(N, H, W) or (N, H, W, 1)")
    if images.shape[-1] != 3:
        raise ValueError(f"`images` must have shape (N, H, W, 3), got {tuple(images.shape)}")
    if heatmaps.ndim == 4:
        if heatmaps.shape[-1] != 1:
            raise ValueError(f"`heatmaps` must have shape (N, H, W) or (N, H, W, 1), got {tuple(heatmaps.shape)}")
        heatmaps = heatmaps[..., 0]
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    count = images.shape[0]
    if heatmaps.shape[0] != count or labels.shape != (count,):
        raise ValueError(
            f"`images`, `heatmaps` and `labels` must hold the same number of records, got shapes "
            f"{tuple(images.shape)}, {tuple(heatmaps.shape)} and {tuple(labels.shape)}"
        )
    if labels.dtype.kind not in "iu" or ((labels < 0) | (labels >= NUM_CLASSES)).any():
        raise ValueError(f"`labels` must be integers in [0, {NUM_CLASSES}), got {labels!r}")
    if tokens is not None:
        tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.float64)
        if tokens.shape != (count,):
            raise ValueError(f"`tokens` must have shape ({count},), got {tuple(tokens.shape)}")
    with TFRecordWriter(path) as writer:
        for i in range(count):
            token = None if tokens is None else float(tokens[i])
            writer.write(encode_clickme_example(images[i], heatmaps[i], int(labels[i]), token, quality))
    return count


# ----------------------------------------------------------------------------- shard discovery
def _natural_key(path: Path) -> Tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def find_clickme_shards(shards_paths_or_dir: Union[PathLike, Sequence[PathLike]],
                        split: Optional[str] = None) -> List[Path]:
    """Resolve a directory, a single file or a list of files to shard paths.

    A directory is searched for the ``split``'s names (``train-*.tfrecords`` or the
    reference's cache names ``clickme_train_*``; ``val-*``/``clickme_val_*``; any
    ``*.tfrecord(s)`` when ``split`` is None), sorted naturally (``train-2`` before ``train-10``).
    """
    if split not in SHARD_PATTERNS:
        raise ValueError(f"`split` must be one of {list(SHARD_PATTERNS)}, got {split!r}")
    if isinstance(shards_paths_or_dir, (str, os.PathLike)):
        root = Path(shards_paths_or_dir).expanduser()
        if root.is_dir():
            found = {p for pattern in SHARD_PATTERNS[split] for p in root.glob(pattern) if p.is_file()}
            found = {p for p in found if not p.name.startswith(".")}  # skip unfinished downloads
            if not found:
                raise FileNotFoundError(
                    f"no ClickMe {split or ''} shards ({' or '.join(SHARD_PATTERNS[split])}) in {root}; "
                    f"download them with harmonizer_fast.common.download_clickme({str(root)!r}) "
                    "or pass the shard paths"
                )
            return sorted(found, key=_natural_key)
        paths = [root]
    else:
        paths = [Path(p).expanduser() for p in shards_paths_or_dir]
        if not paths:
            raise ValueError("`shards_paths` is empty: pass a directory or at least one TFRecord file")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"ClickMe shard(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return paths


# ----------------------------------------------------------------------------- dataset
def _distributed_rank_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ClickMeRecords:
    """Random access to the records of ClickMe shards (a map-style record set).

    At construction every shard's record headers are indexed (12 bytes read per record,
    length checksums verified); records are then read by offset, data checksum verified.
    ``get_batch(indices)`` returns a :class:`ClickMeBatch` (with tokens), the interface of
    the trainer's record sets (``harmonizer_fast.training.data_mix``). Open files are
    cached per process, so an instance can be shared with forked DataLoader workers.

    Args:
        shards_paths: TFRecord files, or a directory holding them.
        num_classes: one-hot width.
        check_crc: verify checksums (leave True unless profiling).
        progress: progress bar while indexing.
    """

    def __init__(self, shards_paths: Union[PathLike, Sequence[PathLike]], num_classes: int = NUM_CLASSES,
                 check_crc: bool = True, progress: bool = True):
        from tqdm.auto import tqdm

        self.paths = [str(p) for p in find_clickme_shards(shards_paths)]
        self.num_classes = int(num_classes)
        self.check_crc = bool(check_crc)
        offsets = [
            index_tfrecord(path, self.check_crc)
            for path in tqdm(self.paths, desc="indexing ClickMe shards", unit="shard", disable=not progress,
                             leave=False)
        ]
        counts = [len(o) for o in offsets]
        self._offsets = np.concatenate(offsets)
        self._file_ids = np.repeat(np.arange(len(offsets), dtype=np.int32), counts)
        self._file_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if len(self) == 0:
            raise ValueError(f"the ClickMe shards hold no records: {self.paths[:5]}")
        self._handles: Dict[int, object] = {}
        self._handles_pid = os.getpid()

    def __len__(self) -> int:
        return int(self._offsets.shape[0])

    def location(self, index: int) -> Tuple[str, int, int]:
        """``(path, index in that file, byte offset)`` of record ``index``."""
        file_id = int(self._file_ids[index])
        return self.paths[file_id], int(index - self._file_starts[file_id]), int(self._offsets[index])

    def read(self, index: int) -> bytes:
        """The serialized record ``index`` (checksums verified)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range [0, {len(self)})")
        if self._handles_pid != os.getpid():  # forked: never share file positions with the parent
            self._handles, self._handles_pid = {}, os.getpid()
        file_id = int(self._file_ids[index])
        if file_id not in self._handles:
            self._handles[file_id] = open(self.paths[file_id], "rb")
        path, index_in_file, offset = self.location(index)
        return read_record_at(self._handles[file_id], path, index_in_file, offset, self.check_crc)

    def get_batch(self, indices: Sequence[int]) -> ClickMeBatch:
        """Parse records ``indices`` into one :class:`ClickMeBatch`."""
        indices = [int(i) for i in indices]
        records = [self.read(i) for i in indices]
        try:
            return parse_clickme_records(records, with_tokens=True, num_classes=self.num_classes)
        except ValueError as exc:
            where = ["{}#{}".format(*self.location(i)[:2]) for i in indices]
            raise ValueError(f"could not parse the ClickMe records {where}: {exc}") from exc

    def __getitem__(self, index: int) -> ClickMeBatch:
        """One parsed record (unbatched: image (3, 224, 224), heatmap (224, 224), ...)."""
        return ClickMeBatch(*(item[0] for item in self.get_batch([index])))

    def close(self) -> None:
        """Close the cached file handles (they reopen on demand)."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class ClickMeDataset(IterableDataset):
    """Batches of parsed ClickMe records, split across DDP ranks and DataLoader workers.

    An epoch:

    1. order: all records, shard after shard (file order), or a permutation drawn from
       ``numpy.random.default_rng([seed, epoch])`` when ``shuffle``;
    2. global batches: consecutive chunks of ``batch_size`` (the last, partial one dropped
       when ``drop_last``, as the reference's ``drop_remainder=True``);
    3. DDP: global batch ``b`` goes to rank ``b % world_size``; the batch count is cut to a
       multiple of ``world_size`` so that ranks stay in step;
    4. DataLoader workers: local batch ``j`` is built by worker ``(j - start_batch) % num_workers``,
       which is the order a DataLoader collects them in, so the batches (and their order)
       are the same for any ``num_workers``.

    Resuming: :meth:`set_epoch` and :meth:`set_start_batch` choose the epoch (shuffle order)
    and how many local batches to skip; skipped batches are never read. Call them before
    the DataLoader iterator is created (workers copy the dataset then);
    :class:`ClickMeLoader` does this for you through ``state_dict``/``load_state_dict``.

    Args:
        records: a :class:`ClickMeRecords`, or shard paths / a directory to build one from.
        batch_size, shuffle, drop_last, seed, with_tokens: see :func:`load_clickme`.
        rank, world_size: explicit DDP split (default: torch.distributed's when initialised).
        progress: progress bar while indexing (when ``records`` are paths).
    """

    def __init__(self, records: Union[ClickMeRecords, PathLike, Sequence[PathLike]], batch_size: int = 64,
                 shuffle: bool = False, drop_last: bool = True, seed: int = 0, with_tokens: bool = False,
                 num_classes: int = NUM_CLASSES, rank: Optional[int] = None, world_size: Optional[int] = None,
                 progress: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both `rank` and `world_size`, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank}")
        if not isinstance(records, ClickMeRecords):
            records = ClickMeRecords(records, num_classes=num_classes, progress=progress)
        self.records = records
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.with_tokens = bool(with_tokens)
        self._rank, self._world_size = rank, world_size
        self._bound_distributed: Optional[Tuple[int, int]] = None
        self.epoch = 0
        self.start_batch = 0

    def rank_and_world_size(self) -> Tuple[int, int]:
        """This process's DDP rank and the world size: explicit, else bound, else torch.distributed's."""
        if self._world_size is not None:
            return self._rank, self._world_size
        if self._bound_distributed is not None:
            return self._bound_distributed
        return _distributed_rank_world()

    def bind_distributed(self) -> None:
        """Record torch.distributed's rank and world size now, in the main process.

        DataLoader workers started with ``spawn`` or ``forkserver`` do not inherit the
        process group, so they use the values bound here (:class:`ClickMeLoader` binds
        them before every pass).
        """
        self._bound_distributed = None
        self._bound_distributed = self.rank_and_world_size()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (only the shuffle order depends on it)."""
        self.epoch = int(epoch)

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first ``start_batch`` batches of this rank in the coming iteration."""
        if start_batch < 0:
            raise ValueError(f"`start_batch` must be >= 0, got {start_batch}")
        self.start_batch = int(start_batch)

    def _global_batches(self) -> List[np.ndarray]:
        count = len(self.records)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(count) if self.shuffle else np.arange(count)
        stop = (count // self.batch_size) * self.batch_size if self.drop_last else count
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def rank_batches(self) -> List[np.ndarray]:
        """Record ids of each batch of this rank for the current epoch (all of them, skipped or not)."""
        rank, world_size = self.rank_and_world_size()
        batches = self._global_batches()
        usable = len(batches) - len(batches) % world_size
        return batches[rank:usable:world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.rank_batches())

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        batches = self.rank_batches()
        try:
            for j in range(self.start_batch + worker_id, len(batches), num_workers):
                batch = self.records.get_batch(batches[j])
                yield batch if self.with_tokens else tuple(batch[:3])
        finally:
            self.records.close()


def _keep_batch(batch):
    """The dataset yields finished batches; DataLoader's default would turn tuples into lists."""
    return batch


class ClickMeLoader(DataLoader):
    """A DataLoader over a :class:`ClickMeDataset` that can resume mid-epoch.

    It counts the batches it hands out: ``state_dict()`` gives ``{"epoch", "batch"}``
    (``batch`` = batches of this rank already yielded in ``epoch``), and after
    ``load_state_dict(state)`` the next iteration starts at that epoch and batch, with
    exactly the batches an uninterrupted run would have produced. A completed pass moves
    to the next epoch (a new shuffle order when shuffling). Breaking out of a loop early
    and iterating again restarts the same epoch from where the last iteration began,
    unless the state is loaded.
    """

    def __init__(self, dataset: ClickMeDataset, num_workers: int = 0, pin_memory: bool = False, **kwargs):
        if not isinstance(dataset, ClickMeDataset):
            raise TypeError(f"`dataset` must be a ClickMeDataset, got {type(dataset).__name__}")
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers=True would keep stale epoch/position copies in the workers")
        kwargs.setdefault("collate_fn", _keep_batch)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        self._epoch = 0
        self._start_batch = 0
        self._yielded = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.load_state_dict({"epoch": epoch, "batch": 0})

    def state_dict(self) -> Dict[str, int]:
        """Position to save with a checkpoint."""
        return {"epoch": self._epoch, "batch": self._yielded}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Restore a position from :meth:`state_dict`."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"invalid loader state {state!r}: epoch and batch must be >= 0")
        if batch >= len(self.dataset):  # that epoch was complete
            epoch, batch = epoch + 1, 0
        self._epoch, self._start_batch, self._yielded = epoch, batch, batch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        self.dataset.bind_distributed()
        self.dataset.set_epoch(self._epoch)
        self.dataset.set_start_batch(self._start_batch)
        self._yielded = self._start_batch
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self.load_state_dict({"epoch": self._epoch + 1, "batch": 0})


def load_clickme(shards_paths: Union[PathLike, Sequence[PathLike]], batch_size: int = 64, num_workers: int = 0,
                 shuffle: bool = False, drop_last: bool = True, seed: int = 0, with_tokens: bool = False,
                 start_batch: int = 0, num_classes: int = NUM_CLASSES, rank: Optional[int] = None,
                 world_size: Optional[int] = None, pin_memory: bool = False, progress: bool = True,
                 **loader_kwargs) -> ClickMeLoader:
    """Load ClickMe shards as batches of ``(images, heatmaps, labels[, tokens])``.

    Args:
        shards_paths: TFRecord files, or a directory holding them.
        batch_size: records per batch (reference default 64).
        num_workers: DataLoader worker processes decoding JPEGs in parallel.
        shuffle: shuffle records globally each epoch (the reference does not shuffle).
        drop_last: drop the last partial batch (the reference's ``drop_remainder=True``).
        seed: shuffle seed (the order of epoch ``e`` is ``default_rng([seed, e])``).
        with_tokens: also yield (B,) heatmap weights (the ``tokens`` feature, 1 when absent).
        start_batch: batches to skip in the first epoch (see :class:`ClickMeLoader` to resume).
        num_classes: one-hot width.
        rank, world_size: DDP split; default: torch.distributed's when initialised, else one process.
        pin_memory: DataLoader option.
        progress: progress bar while indexing the shards.
        **loader_kwargs: other DataLoader options (``prefetch_factor``, ``timeout``, ...).

    Returns:
        a :class:`ClickMeLoader`; see the module docstring for the batch layout. Nothing is
        downloaded (see :func:`download_clickme`).
    """
    dataset = ClickMeDataset(shards_paths, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                             with_tokens=with_tokens, num_classes=num_classes, rank=rank, world_size=world_size,
                             progress=progress)
    loader = ClickMeLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, **loader_kwargs)
    if start_batch:
        loader.load_state_dict({"epoch": 0, "batch": start_batch})
    return loader


def _load_split(split: str, shards_paths_or_dir, batch_size: int, kwargs) -> ClickMeLoader:
    if isinstance(shards_paths_or_dir, int) and not isinstance(shards_paths_or_dir, bool):
        raise TypeError(
            f"load_clickme_{split}: the first argument is the shard directory or paths (got the int "
            f"{shards_paths_or_dir}); pass the batch size as batch_size=..."
        )
    if shards_paths_or_dir is None:
        shards_paths_or_dir = os.environ.get("CLICKME_DIR", str(DEFAULT_CLICKME_DIR))
    return load_clickme(find_clickme_shards(shards_paths_or_dir, split), batch_size=batch_size, **kwargs)


def load_clickme_train(shards_paths_or_dir: Union[None, PathLike, Sequence[PathLike]] = None, batch_size: int = 64,
                       **kwargs) -> ClickMeLoader:
    """ClickMe training shards (318 in the full set) via :func:`load_clickme`.

    ``shards_paths_or_dir``: shard paths, or a directory with ``train-*.tfrecords`` /
    ``clickme_train_*``; default ``$CLICKME_DIR`` or ``~/.keras/datasets/click-me`` (the
    reference's download cache). Nothing is downloaded.
    """
    return _load_split("train", shards_paths_or_dir, batch_size, kwargs)


def load_clickme_val(shards_paths_or_dir: Union[None, PathLike, Sequence[PathLike]] = None, batch_size: int = 64,
                     **kwargs) -> ClickMeLoader:
    """ClickMe validation shards (17 in the full set) via :func:`load_clickme`; see :func:`load_clickme_train`."""
    return _load_split("val", shards_paths_or_dir, batch_size, kwargs)


# ----------------------------------------------------------------------------- download
def download_clickme(dest: PathLike, splits: Sequence[str] = ("train", "val"), base_url: str = CLICKME_BASE_URL,
                     progress: bool = True) -> List[Path]:
    """Download the ClickMe shards into ``dest`` (resumable: complete shards are kept).

    Each shard is streamed into a hidden temporary file with both checksums of every
    record verified, then renamed to ``{split}-{i}.tfrecords``; a shard already present
    whose records all verify is skipped. 318 train and 17 validation shards;
    :func:`load_clickme_train` / :func:`load_clickme_val` then take ``dest``.

    Raises:
        TFRecordError: a downloaded shard is corrupt (nothing is written for it).
        urllib.error.URLError: the server cannot be reached.
    """
    from tqdm.auto import tqdm

    counts = {"train": NB_TRAIN_SHARDS, "val": NB_VAL_SHARDS}
    unknown = [s for s in splits if s not in counts]
    if unknown:
        raise ValueError(f"`splits` must be among {list(counts)}, got {unknown}")
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [(split, i) for split in splits for i in range(counts[split])]
    paths = []
    for split, i in tqdm(jobs, desc="ClickMe shards", unit="shard", disable=not progress):
        target = dest / f"{split}-{i}.tfrecords"
        paths.append(target)
        if target.is_file():
            try:
                for _ in read_tfrecord(target):
                    pass
                continue
            except TFRecordError:
                pass  # incomplete or corrupt: fetch it again
        url = f"{base_url}/{split}/{split}-{i}.tfrecords"
        # records are checked as they arrive and written through the atomic writer, so
        # an interrupted or corrupt download never appears under the shard's name
        with urllib.request.urlopen(url, timeout=60) as response, TFRecordWriter(target) as writer:
            for record in iter_records(response, url):
                writer.write(record)
    return paths
