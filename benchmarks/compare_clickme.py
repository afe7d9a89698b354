"""ClickMe data path: CRC32C (C++ SSE4.2 / slicing-by-8 vs pure Python) and reading a shard.

Reading a TFRecord shard verifies two CRC32C checksums per record, over every byte of the
JPEGs; the pure-Python table loop (the fallback when the extension is missing) is the
baseline. The parse case times what one batch of the DataLoader costs on one core:
JPEG decoding, two resizes, the blur and the one-hot labels.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Tuple

import numpy as np

import harmonizer_fast.common.tfrecord as tfrecord
from benchmarks._timing import Comparison, measure
from harmonizer_fast._ext import extension
from harmonizer_fast.common import parse_clickme_records, read_tfrecord, write_clickme_shard


def sample_shard(directory: Path, count: int) -> Path:
    """A shard of ``count`` natural-looking 256x256 records (smooth noise, so JPEGs are ~20-40 kB)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, size=(count, 32, 32, 3))
    images = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2) + rng.normal(0, 20, size=(count, 256, 256, 3))
    heatmaps = np.repeat(np.repeat(rng.uniform(0, 255, size=(count, 16, 16)), 16, axis=1), 16, axis=2)
    path = directory / "bench-0.tfrecords"
    write_clickme_shard(path, np.clip(images, 0, 255).astype(np.uint8), heatmaps.astype(np.uint8),
                        rng.integers(0, 1000, size=count))
    return path


def compare(quick: bool = False) -> Tuple[str, List[Comparison]]:
    ext = extension()
    if ext is None:
        raise RuntimeError("the C++ extension is not built; nothing to compare the Python CRC with")
    repeats = 3 if quick else 7
    size = (1 << 18) if quick else (1 << 20)
    blob = np.random.default_rng(1).bytes(size)
    expected = tfrecord.crc32c_python(blob)
    assert ext.crc32c(blob) == ext.crc32c_portable(blob) == expected
    candidates = [measure(lambda: ext.crc32c_portable(blob), repeats, name="C++ slicing-by-8")]
    if ext.crc32c_hardware_available():
        candidates.append(measure(lambda: ext.crc32c(blob), repeats, name="C++ SSE4.2 crc32"))
    crc_case = Comparison(f"crc32c of {size >> 10} KiB",
                          measure(lambda: tfrecord.crc32c_python(blob), max(2, repeats // 2), name="pure Python table"),
                          candidates)

    comparisons = [crc_case]
    with tempfile.TemporaryDirectory() as tmp:
        count = 16 if quick else 64
        shard = sample_shard(Path(tmp), count)
        mib = os.path.getsize(shard) / 2**20

        def read_all():
            return sum(len(r) for r in read_tfrecord(shard))

        original = tfrecord.extension
        tfrecord.extension = lambda: None
        try:
            python_read = measure(read_all, max(2, repeats // 2), name="Python CRC")
        finally:
            tfrecord.extension = original
        comparisons.append(Comparison(f"read + verify a shard of {count} records ({mib:.1f} MiB)", python_read,
                                      [measure(read_all, repeats, name="C++ CRC")]))
        records = list(read_tfrecord(shard))[:16]
        comparisons.append(Comparison(
            "parse a batch of 16 records (JPEG decode, resize, blur, one-hot)",
            measure(lambda: parse_clickme_records(records), repeats, name="parse_clickme_records"), [],
            note="absolute cost, no baseline",
        ))
    return "ClickMe data (`clickme`)", comparisons
