"""Corrupt or hostile data files and bad options fail with the reader's own named errors."""
import gc
import io
import struct
import warnings

import numpy as np
import pytest

from harmonizer_fast.cli import main
from harmonizer_fast.common import ClickMeRecords, TFRecordError, read_tfrecord, write_clickme_shard
from harmonizer_fast.common.batch_order import BatchOrder
from harmonizer_fast.common.tfrecord import iter_records, masked_crc32c, write_tfrecord


def _forged_header(length: int) -> bytes:
    field = struct.pack("<Q", length)
    return field + struct.pack("<I", masked_crc32c(field))  # a valid CRC for a lying length


@pytest.mark.parametrize("length", [2**63 - 1, 2**40, 10_000_000])
def test_forged_length_with_a_valid_crc(tmp_path, length):
    path = tmp_path / "forged.tfrecords"
    write_tfrecord(path, [b"fine"])
    with open(path, "ab") as handle:
        handle.write(_forged_header(length) + b"short")
    with pytest.raises(TFRecordError, match=r"forged\.tfrecords.*record 1.*(implausible length|truncated)"):
        list(read_tfrecord(path))


def test_forged_length_on_a_stream_that_cannot_seek():
    class Pipe(io.RawIOBase):
        def __init__(self, data):
            self._inner = io.BytesIO(data)

        def readable(self):
            return True

        def seekable(self):
            return False

        def readinto(self, buffer):
            chunk = self._inner.read(len(buffer))
            buffer[:len(chunk)] = chunk
            return len(chunk)

    stream = io.BufferedReader(Pipe(_forged_header(1 << 30) + b"x" * 100))
    with pytest.raises(TFRecordError, match="truncated record of 1073741824 data bytes"):
        list(iter_records(stream, "pipe://input"))


def _shard_with_tokens(path, tokens):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (len(tokens), 32, 32, 3), dtype=np.uint8)
    heatmaps = rng.integers(0, 255, (len(tokens), 32, 32), dtype=np.uint8)
    write_clickme_shard(path, images, heatmaps, np.arange(len(tokens)), tokens)
    return path


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_record_tokens_must_be_finite_and_non_negative(tmp_path, bad):
    records = ClickMeRecords(_shard_with_tokens(tmp_path / "t.tfrecords", [1.0, bad]), num_classes=5, progress=False)
    with records:
        records.get_batch([0])  # the good record parses
        with pytest.raises(ValueError, match=r"t\.tfrecords#1.*tokens.*finite and >= 0"):
            records.get_batch([0, 1])


def test_records_close_their_files(tmp_path):
    path = _shard_with_tokens(tmp_path / "t.tfrecords", [1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        records = ClickMeRecords(path, num_classes=5, progress=False)
        records.get_batch([0, 1])
        del records
        gc.collect()
        with ClickMeRecords(path, num_classes=5, progress=False) as records:
            records.get_batch([1])
        assert records._handles == {}


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_eval_clickme_rejects_a_bad_batch_size(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval-clickme", "--sample", "--model", "test_resnet", "--batch-size", value])
    assert info.value.code == 2
    assert "--batch-size" in capsys.readouterr().err


def test_batch_order_slices_global_batches_and_deals_rank_batches_alike():
    whole = BatchOrder(20, 4, seed=5, world_size=1)
    ranks = [BatchOrder(20, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 3):
        expected = whole.rank_batches(epoch)
        pairs = zip(*(r.rank_batches(epoch) for r in ranks))
        assert [np.concatenate(p).tolist() for p in pairs] == [b.tolist() for b in expected]
    assert whole.rank_batches(0)[0].tolist() != whole.rank_batches(1)[0].tolist()  # reshuffled each epoch
    # 10 records, batches of 3 on 2 ranks, keeping the partial batch: ranks stay in step
    kept = [BatchOrder(10, 3, shuffle=False, drop_last=False, rank=r, world_size=2).rank_batches(0) for r in (0, 1)]
    assert [b.tolist() for b in kept[0]] == [[0, 1, 2], [6, 7, 8]]
    assert [b.tolist() for b in kept[1]] == [[3, 4, 5], [9]]
    assert len(BatchOrder(8, 3, shuffle=False, drop_last=False, world_size=2)) == 1  # rank 1 would get nothing
    with pytest.raises(ValueError, match="rank"):
        BatchOrder(8, 3, rank=2, world_size=2)
