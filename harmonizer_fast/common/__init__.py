"""Data utilities (``harmonization.common`` in the reference): blur, preprocessing, ClickMe.

* :mod:`~harmonizer_fast.common.blur`: ``gaussian_kernel``, ``gaussian_blur``;
* :mod:`~harmonizer_fast.common.preprocessing`: ``preprocess_input``;
* :mod:`~harmonizer_fast.common.tfrecord` and :mod:`~harmonizer_fast.common.example`:
  TFRecord files and ``tf.train.Example`` records without TensorFlow;
* :mod:`~harmonizer_fast.common.clickme`: the ClickMe dataset (``load_clickme``,
  ``load_clickme_train``, ``load_clickme_val``).
"""
from harmonizer_fast.common.blur import BLUR_KERNEL_SIZE, BLUR_SIGMA, gaussian_blur, gaussian_kernel
from harmonizer_fast.common.clickme import (
    CLICKME_BASE_URL,
    GAUSSIAN_KERNEL,
    NB_TRAIN_SHARDS,
    NB_VAL_SHARDS,
    ClickMeBatch,
    ClickMeDataset,
    ClickMeLoader,
    ClickMeRecords,
    clickme_heatmap_transform,
    decode_clickme_example,
    download_clickme,
    encode_clickme_example,
    find_clickme_shards,
    load_clickme,
    load_clickme_train,
    load_clickme_val,
    parse_clickme_record,
    parse_clickme_records,
    write_clickme_shard,
)
from harmonizer_fast.common.example import ExampleDecodeError, Feature, decode_example, encode_example
from harmonizer_fast.common.preprocessing import IMAGENET_MEAN, IMAGENET_STD, preprocess_input
from harmonizer_fast.common.tfrecord import (
    TFRecordError,
    TFRecordWriter,
    crc32c,
    index_tfrecord,
    masked_crc32c,
    read_tfrecord,
    write_tfrecord,
)

#: the reference's name for :func:`parse_clickme_record`
parse_clickme_prototype = parse_clickme_record

__all__ = [
    "BLUR_KERNEL_SIZE",
    "BLUR_SIGMA",
    "CLICKME_BASE_URL",
    "ClickMeBatch",
    "ClickMeDataset",
    "ClickMeLoader",
    "ClickMeRecords",
    "ExampleDecodeError",
    "Feature",
    "GAUSSIAN_KERNEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NB_TRAIN_SHARDS",
    "NB_VAL_SHARDS",
    "TFRecordError",
    "TFRecordWriter",
    "clickme_heatmap_transform",
    "crc32c",
    "decode_clickme_example",
    "decode_example",
    "download_clickme",
    "encode_clickme_example",
    "encode_example",
    "find_clickme_shards",
    "gaussian_blur",
    "gaussian_kernel",
    "index_tfrecord",
    "load_clickme",
    "load_clickme_train",
    "load_clickme_val",
    "masked_crc32c",
    "parse_clickme_prototype",
    "parse_clickme_record",
    "parse_clickme_records",
    "preprocess_input",
    "read_tfrecord",
    "write_clickme_shard",
    "write_tfrecord",
]
