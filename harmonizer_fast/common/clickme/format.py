"""The ClickMe record format: constants, parsing (as the reference's ``parse_clickme_prototype``) and writing."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from harmonizer_fast.spec import one_hot, tf_resize_bilinear as _bilinear
from harmonizer_fast.common.blur import gaussian_blur, gaussian_kernel
from harmonizer_fast.common.example import Feature, decode_example, encode_example
from harmonizer_fast.common.tfrecord import (
    TFRecordWriter,
)

from harmonizer_fast.common.clickme.jpeg import _decode_jpeg

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
    one_hot_labels = one_hot([item[2] for item in decoded], num_classes, name="ClickMe label")
    tokens = [item[3] for item in decoded]
    bad_tokens = [(i, t) for i, t in enumerate(tokens) if not (math.isfinite(t) and t >= 0)]
    if bad_tokens:
        raise ValueError(f"ClickMe `tokens` must be finite and >= 0, got (batch position, token) {bad_tokens[:5]}")
    images = _bilinear(_stack_nchw([item[0] for item in decoded], IMAGE_SIZE), IMAGE_SIZE)
    heatmaps = clickme_heatmap_transform(_stack_nchw([item[1][:, :, None] for item in decoded], HEATMAP_BLUR_SIZE)[:, 0])
    if not with_tokens:
        return images, heatmaps, one_hot_labels
    return ClickMeBatch(images, heatmaps, one_hot_labels, torch.tensor(tokens, dtype=torch.float32))


def parse_clickme_record(record: bytes, with_tokens: bool = False,
                         num_classes: int = NUM_CLASSES) -> Tuple[torch.Tensor, ...]:
    """Parse one serialized ClickMe record (``parse_clickme_prototype`` in the reference).

    Returns:
        ``image`` (3, 224, 224) float32 0..255, ``heatmap`` (224, 224) float32, ``label``
        (num_classes,) float32 one-hot, and ``token`` () float32 with ``with_tokens=True``.
    """
    return tuple(item[0] for item in parse_clickme_records([record], with_tokens, num_classes))



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

    def jpeg(array: np.ndarray, mode: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array, mode).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    features = {"image": jpeg(image, "RGB"), "heatmap": jpeg(heatmap, "L"), "label": Feature("int64_list", (int(label),))}
    if token is not None:
        features["tokens"] = Feature("float_list", (float(token),))
    return encode_example(features)


def write_clickme_shard(path: PathLike, images, heatmaps, labels, tokens=None, quality: int = 95,
                        overwrite: bool = False) -> int:
    """Write a ClickMe TFRecord shard (atomically) from uint8 arrays.

    Args:
        path: output file.
        images: (N, H, W, 3) uint8 RGB (the storage layout of JPEG; ClickMe uses 256x256).
        heatmaps: (N, H, W) or (N, H, W, 1) uint8.
        labels: (N,) ints in [0, 1000).
        tokens: optional (N,) floats, written as the ``tokens`` feature.
        quality: JPEG quality (PIL).
        overwrite: replace an existing ``path``; without it an existing file raises
            ``FileExistsError`` before anything is encoded.

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
    with TFRecordWriter(path, overwrite=overwrite) as writer:
        for i in range(count):
            token = None if tokens is None else float(tokens[i])
            writer.write(encode_clickme_example(images[i], heatmaps[i], int(labels[i]), token, quality))
    return count
