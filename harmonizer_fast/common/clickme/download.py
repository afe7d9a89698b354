"""Fetching the ClickMe shards (resumable, verified, atomic)."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import List, Sequence, Union

from tqdm.auto import tqdm

from harmonizer_fast.common.tfrecord import (
    TFRecordError,
    TFRecordWriter,
    iter_records,
    read_tfrecord,
)

from harmonizer_fast.common.clickme.format import CLICKME_BASE_URL, NB_TRAIN_SHARDS, NB_VAL_SHARDS

PathLike = Union[str, "os.PathLike[str]"]

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
        # an interrupted or corrupt download never appears under the shard's name; a file
        # still at ``target`` here failed the check above, so replacing it is the point
        with urllib.request.urlopen(url, timeout=60) as response, TFRecordWriter(target, overwrite=True) as writer:
            for record in iter_records(response, url):
                writer.write(record)
    return paths
