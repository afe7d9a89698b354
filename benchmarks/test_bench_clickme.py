"""pytest-benchmark timings of the ClickMe data path (not collected by the test suite)."""
import numpy as np
import pytest

from benchmarks.compare_clickme import sample_shard
from harmonizer_fast._ext import extension
from harmonizer_fast.common import crc32c, parse_clickme_records, read_tfrecord
from harmonizer_fast.common.tfrecord import crc32c_python

BLOB = np.random.default_rng(0).bytes(1 << 20)


def test_crc32c_extension(benchmark):
    if extension() is None:
        pytest.skip("C++ extension not built")
    assert benchmark(crc32c, BLOB) == crc32c_python(BLOB)


def test_crc32c_python_64k(benchmark):
    assert benchmark(crc32c_python, BLOB[:1 << 16]) == crc32c(BLOB[:1 << 16])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return list(read_tfrecord(sample_shard(tmp_path_factory.mktemp("bench"), 16)))


def test_parse_batch_of_16(benchmark, records):
    images, heatmaps, labels = benchmark(parse_clickme_records, records)
    assert images.shape == (16, 3, 224, 224)
