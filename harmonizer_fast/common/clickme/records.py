"""ClickMe shards on disk: discovery by split and random access to their records."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm


from harmonizer_fast.common.tfrecord import (
    index_tfrecord,
    read_record_at,
)

from harmonizer_fast.common.clickme.format import NUM_CLASSES, SHARD_PATTERNS, ClickMeBatch, parse_clickme_records

PathLike = Union[str, "os.PathLike[str]"]

def _natural_key(path: Path) -> Tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def find_clickme_shards(shards_paths_or_dir: Union[PathLike, Sequence[PathLike]],
                        split: Optional[str] = None) -> List[Path]:
    """Resolve a directory, a single file or a list of files and directories to shard paths.

    A directory is searched for the ``split``'s names (``train-*.tfrecords`` or the
    reference's cache names ``clickme_train_*``; ``val-*``/``clickme_val_*``; any
    ``*.tfrecord(s)`` when ``split`` is None), sorted naturally (``train-2`` before ``train-10``);
    in a list, each directory is expanded so, in place (the command-line ``--shards DIR``).
    """
    if split not in SHARD_PATTERNS:
        raise ValueError(f"`split` must be one of {list(SHARD_PATTERNS)}, got {split!r}")
    if isinstance(shards_paths_or_dir, (str, os.PathLike)):
        paths = [Path(shards_paths_or_dir).expanduser()]
    else:
        paths = [Path(p).expanduser() for p in shards_paths_or_dir]
        if not paths:
            raise ValueError("`shards_paths` is empty: pass a directory or at least one TFRecord file")
    missing = [str(p) for p in paths if not p.is_file() and not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"ClickMe shard(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [shard for p in paths for shard in (_shards_in_directory(p, split) if p.is_dir() else [p])]


def _shards_in_directory(root: Path, split: Optional[str]) -> List[Path]:
    found = {p for pattern in SHARD_PATTERNS[split] for p in root.glob(pattern) if p.is_file()}
    found = {p for p in found if not p.name.startswith(".")}  # skip unfinished downloads
    if not found:
        raise FileNotFoundError(
            f"no ClickMe {split + ' ' if split else ''}shards ({' or '.join(SHARD_PATTERNS[split])}) in {root}; "
            f"download them with harmonizer_fast.common.download_clickme({str(root)!r}) "
            "or pass the shard paths"
        )
    return sorted(found, key=_natural_key)



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

    def __enter__(self) -> "ClickMeRecords":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # handles are opened lazily for random access; a dropped record set must not leak them
        if self.__dict__.get("_handles"):
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
