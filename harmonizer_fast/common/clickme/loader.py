"""Resumable, DDP- and worker-aware ClickMe batches: the dataset, its DataLoader, ``load_clickme*``."""
from __future__ import annotations

import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from harmonizer_fast.spec import check_positive_int
from harmonizer_fast.common.batch_order import BatchOrder


from harmonizer_fast.common.clickme.format import NUM_CLASSES, DEFAULT_CLICKME_DIR
from harmonizer_fast.common.clickme.records import ClickMeRecords, _distributed_rank_world, find_clickme_shards

PathLike = Union[str, "os.PathLike[str]"]

class ClickMeDataset(IterableDataset):
    """Batches of parsed ClickMe records, split across DDP ranks and DataLoader workers.

    An epoch follows :class:`~harmonizer_fast.common.batch_order.BatchOrder` with
    ``per_rank=batch_size``: records shard after shard (file order), or a permutation drawn
    from ``numpy.random.default_rng([seed, epoch])`` when ``shuffle``; batch ``b`` of
    ``batch_size`` records goes to rank ``b % world_size`` (the incomplete last batch dropped
    when ``drop_last``, as the reference's ``drop_remainder=True``, and the batch count cut so
    that ranks stay in step). DataLoader workers: local batch ``j`` is built by worker ``(j - start_batch) % num_workers``,
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
        check_positive_int(batch_size, "batch_size")
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
        if len(self) == 0:  # an epoch without a batch would end every loop at once, silently
            rank, world_size = self.rank_and_world_size()
            raise ValueError(
                f"{len(records)} ClickMe record(s) give no batch of `batch_size` {batch_size}"
                f"{f' per rank ({world_size} ranks)' if world_size > 1 else ''} with drop_last={self.drop_last}: "
                "pass a smaller batch_size" + (" or drop_last=False" if self.drop_last and len(records) else "")
            )

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

    def batch_order(self) -> BatchOrder:
        """The shared order (:class:`~harmonizer_fast.common.batch_order.BatchOrder`) of this rank."""
        rank, world_size = self.rank_and_world_size()
        return BatchOrder(len(self.records), self.batch_size, self.seed, self.shuffle, self.drop_last, rank, world_size)

    def rank_batches(self) -> List[np.ndarray]:
        """Record ids of each batch of this rank for the current epoch (all of them, skipped or not)."""
        return self.batch_order().rank_batches(self.epoch)

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
