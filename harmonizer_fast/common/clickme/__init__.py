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

Modules, one concern each: :mod:`.jpeg` (decoders), :mod:`.format` (parsing and writing
records), :mod:`.records` (shard discovery, random access), :mod:`.loader` (the resumable
DDP-aware dataset and DataLoader, ``load_clickme*``), :mod:`.download`.
"""
from harmonizer_fast.common.clickme.download import download_clickme
from harmonizer_fast.common.clickme.format import (
    CLICKME_BASE_URL,
    DEFAULT_CLICKME_DIR,
    GAUSSIAN_KERNEL,
    HEATMAP_BLUR_SIZE,
    IMAGE_SIZE,
    NB_TRAIN_SHARDS,
    NB_VAL_SHARDS,
    NUM_CLASSES,
    SHARD_PATTERNS,
    ClickMeBatch,
    clickme_heatmap_transform,
    decode_clickme_example,
    encode_clickme_example,
    parse_clickme_record,
    parse_clickme_records,
    write_clickme_shard,
)
from harmonizer_fast.common.clickme.jpeg import JPEG_DECODERS, jpeg_backend
from harmonizer_fast.common.clickme.loader import ClickMeDataset, ClickMeLoader, load_clickme, load_clickme_train, load_clickme_val
from harmonizer_fast.common.clickme.records import ClickMeRecords, find_clickme_shards

__all__ = [
    "CLICKME_BASE_URL", "DEFAULT_CLICKME_DIR", "GAUSSIAN_KERNEL", "HEATMAP_BLUR_SIZE", "IMAGE_SIZE", "JPEG_DECODERS",
    "NB_TRAIN_SHARDS", "NB_VAL_SHARDS", "NUM_CLASSES", "SHARD_PATTERNS", "ClickMeBatch", "ClickMeDataset",
    "ClickMeLoader", "ClickMeRecords", "clickme_heatmap_transform", "decode_clickme_example", "download_clickme",
    "encode_clickme_example", "find_clickme_shards", "jpeg_backend", "load_clickme", "load_clickme_train",
    "load_clickme_val", "parse_clickme_record", "parse_clickme_records", "write_clickme_shard",
]
