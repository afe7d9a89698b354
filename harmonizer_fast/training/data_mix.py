"""Resumable batch streams for harmonized training: ClickMe records mixed with plain image folders.

Every stream yields :class:`Batch` tuples ``(images, heatmaps, labels, tokens)``:

- ``images``: (N, 3, H, W) float32 in 0..255 (not normalised, as ClickMe's parser returns them),
- ``heatmaps``: (N, H, W) human importance maps (zeros where there is none),
- ``labels``: (N, K) one-hot rows,
- ``tokens``: (N,) 1 for records with a human map, 0 for images without one, so the
  harmonization term ignores them while the cross entropy still trains on them.

Streams are endless (epoch after epoch) and expose ``state_dict()`` / ``load_state_dict()``
holding plain ints, so a resumed run sees exactly the batches an uninterrupted run would.
The order inside an epoch is the one :class:`harmonizer_fast.common.batch_order.BatchOrder`
gives the ClickMe loader too: independent of the global RNG and of skipped epochs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from harmonizer_fast.spec import shape_of
from harmonizer_fast.common.batch_order import BatchOrder
from harmonizer_fast.spec import check_positive_int, one_hot, tf_resize_bilinear

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
NUM_CLASSES = 1000
IMAGE_SIZE = 224


class Batch(NamedTuple):
    """One training batch (see the module docstring for shapes)."""

    images: torch.Tensor
    heatmaps: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor


# --------------------------------------------------------------------------- map-style datasets


class TensorRecords:
    """In-memory ClickMe-style records: images, human maps and labels indexed together.

    Args:
        images: (N, 3, H, W) float, 0..255.
        heatmaps: (N, H, W) human maps.
        labels: (N,) int class indices or (N, K) one-hot rows.
        tokens: (N,) weights; default 1 (every record has a human map).
        num_classes: K for int labels.
    """

    def __init__(
        self,
        images: torch.Tensor,
        heatmaps: torch.Tensor,
        labels: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"`images` must be a (N, C, H, W) tensor, got {shape_of(images)}")
        n, _, h, w = images.shape
        if not isinstance(heatmaps, torch.Tensor) or tuple(heatmaps.shape) != (n, h, w):
            raise ValueError(f"`heatmaps` must have shape {(n, h, w)}, got {shape_of(heatmaps)}")
        labels = torch.as_tensor(labels)
        if labels.ndim == 1:
            labels = one_hot(labels, num_classes)
        if labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError(f"`labels` must be ({n},) ints or ({n}, K) rows, got {shape_of(labels)}")
        tokens = torch.ones(n) if tokens is None else torch.as_tensor(tokens, dtype=torch.float32)
        if tuple(tokens.shape) != (n,):
            raise ValueError(f"`tokens` must have shape ({n},), got {shape_of(tokens)}")
        self.images = images.float()
        self.heatmaps = heatmaps.float()
        self.labels = labels.float()
        self.tokens = tokens

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return Batch(self.images[idx], self.heatmaps[idx], self.labels[idx], self.tokens[idx])


def _read_image(path: Path, image_size: int) -> torch.Tensor:
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    # Bilinear, half-pixel centres, no antialiasing: the resize ClickMe records go through.
    resized = tf_resize_bilinear(tensor, image_size)
    return resized[0].clamp_(0.0, 255.0)


def _default_class_index(folder_name: str) -> int:
    try:
        return int(folder_name)
    except ValueError:
        raise ValueError(
            f"image folder {folder_name!r} is not an ImageNet class index; name class folders "
            "0..999 or pass `class_to_index` (e.g. a WordNet id -> index mapping)"
        ) from None


class ImageFolderRecords:
    """Images without human maps (tokens 0), labelled by their class folder.

    Layout: ``root/<class>/<image>``; ``<class>`` is an ImageNet index (``0``..``999``) or
    a key of ``class_to_index``. Images are resized to ``image_size`` (bilinear, as ClickMe
    records are), heatmaps are zeros and tokens 0.
    """

    def __init__(
        self,
        roots: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        class_to_index: Optional[Mapping[str, int]] = None,
        image_size: int = IMAGE_SIZE,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        entries: List[Tuple[Path, int]] = []
        for root in map(Path, roots):
            if not root.is_dir():
                raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
            for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
                label = (
                    int(class_to_index[class_dir.name]) if class_to_index is not None and class_dir.name in class_to_index
                    else _default_class_index(class_dir.name)
                )
                if not 0 <= label < num_classes:
                    raise ValueError(f"class folder {str(class_dir)!r} maps to {label}, outside [0, {num_classes})")
                for file in sorted(class_dir.rglob("*")):
                    if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                        entries.append((file, label))
        if not entries:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under class folders of {roots}")
        self.entries = entries
        self.image_size = image_size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.entries)

    def get_batch(self, indices: Sequence[int]) -> Batch:
        images = torch.stack([_read_image(self.entries[i][0], self.image_size) for i in indices])
        labels = one_hot(torch.tensor([self.entries[i][1] for i in indices]), self.num_classes)
        n = len(indices)
        return Batch(images, torch.zeros(n, self.image_size, self.image_size), labels, torch.zeros(n))


# --------------------------------------------------------------------------- resumable streams


class ShuffledBatches:
    """Endless, reshuffled-each-epoch batches of a map-style record set, resumable.

    The order is the shared :class:`~harmonizer_fast.common.batch_order.BatchOrder`: epoch
    ``e`` visits the records in ``numpy.random.default_rng([seed, e])`` order, in global
    batches of ``batch_size``; the last incomplete batch of an epoch is dropped (so every
    step sees the same batch size, which keeps DDP shards and BN statistics uniform).

    Args:
        records: object with ``__len__`` and ``get_batch(indices) -> Batch``.
        batch_size: records per batch.
        seed: base seed of the permutations.
        shuffle: False keeps the file order (evaluation).
        rank, world_size: under DDP each rank takes its contiguous slice of every global
            batch, so the union over ranks is the single-process batch.
    """

    def __init__(self, records, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        check_positive_int(batch_size, "batch_size")
        if batch_size % world_size:
            raise ValueError(f"`batch_size` {batch_size} must be divisible by the world size {world_size}")
        if len(records) < batch_size:
            raise ValueError(f"{len(records)} records cannot fill one batch of {batch_size}")
        self.records = records
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self._order = BatchOrder(len(records), batch_size // world_size, self.seed, shuffle, True, rank, world_size)
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batches = self._order.rank_batches(self.epoch)
            while self.position < len(batches):
                idx = batches[self.position].tolist()
                self.position += 1
                yield self.records.get_batch(idx)
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"data seed {state['seed']} in the checkpoint differs from this run's {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class MixedBatches:
    """Concatenate one batch from each stream per step: ClickMe records plus images without maps.

    With a ClickMe stream of batch ``b1`` and a folder stream of batch ``b2``, every step
    trains on ``b1 + b2`` images, of which the ``b2`` folder images have tokens 0 (cross
    entropy only). The state is the states of both streams.
    """

    def __init__(self, streams: Sequence) -> None:
        if not streams:
            raise ValueError("`streams` must hold at least one batch stream")
        self.streams = list(streams)

    def __iter__(self) -> Iterator[Batch]:
        iterators = [iter(s) for s in self.streams]
        while True:
            parts = [next(it) for it in iterators]
            yield Batch(*(torch.cat([getattr(p, f) for p in parts]) for f in Batch._fields))

    def state_dict(self) -> Dict[str, list]:
        return {"streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        states = state["streams"]
        if len(states) != len(self.streams):
            raise ValueError(f"checkpoint has {len(states)} data streams, this run has {len(self.streams)}")
        for stream, sub in zip(self.streams, states):
            stream.load_state_dict(sub)


def split_batch_size(batch_size: int, folder_fraction: float, world_size: int = 1) -> Tuple[int, int]:
    """(ClickMe, folder) images per step for a total ``batch_size`` and the folder share.

    Both parts stay multiples of ``world_size`` so that every rank gets an equal slice.
    """
    if not 0.0 <= folder_fraction < 1.0:
        raise ValueError(f"`folder_fraction` must lie in [0, 1), got {folder_fraction!r}")
    units = batch_size // world_size
    folder_units = int(round(units * folder_fraction))
    if folder_fraction > 0 and folder_units == 0:
        folder_units = 1
    clickme_units = units - folder_units
    if clickme_units < 1:
        raise ValueError(f"batch_size {batch_size} leaves no ClickMe images with folder_fraction {folder_fraction}")
    return clickme_units * world_size, folder_units * world_size


def build_train_stream(
    clickme: Optional[object],
    batch_size: int,
    image_folders: Sequence[Union[str, os.PathLike]] = (),
    folder_fraction: float = 0.0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    class_to_index: Optional[Mapping[str, int]] = None,
):
    """The trainer's stream: ClickMe records (``TensorRecords`` or record set), optionally
    mixed with image folders (tokens 0) at ``folder_fraction`` of every batch.

    With both ClickMe records and image folders, ``folder_fraction`` must be > 0 (else the
    folders would be ignored); a ``folder_fraction`` > 0 needs image folders (else it would be).
    """
    if clickme is None:
        if not image_folders:
            raise ValueError("training needs ClickMe records, image folders, or both")
        return ShuffledBatches(ImageFolderRecords(image_folders, class_to_index), batch_size, seed, rank=rank, world_size=world_size)
    if image_folders and folder_fraction == 0.0:
        raise ValueError(f"`image_folders` {[str(f) for f in image_folders]} are given with `folder_fraction` 0, "
                         "so none of their images would be used: set the share of each batch they fill "
                         "(--folder-fraction, e.g. 0.25)")
    if not image_folders and folder_fraction > 0.0:
        raise ValueError(f"`folder_fraction` is {folder_fraction!r} but no `image_folders` are given "
                         "(--image-folders): there is nothing to fill that share of each batch with")
    if not image_folders:
        return ShuffledBatches(clickme, batch_size, seed, rank=rank, world_size=world_size)
    n_clickme, n_folder = split_batch_size(batch_size, folder_fraction, world_size)
    folders = ImageFolderRecords(image_folders, class_to_index)
    return MixedBatches([
        ShuffledBatches(clickme, n_clickme, seed, rank=rank, world_size=world_size),
        ShuffledBatches(folders, n_folder, seed + 1_000_003, rank=rank, world_size=world_size),
    ])
