"""ClickMe records: writing shards, parsing as the reference does, the resumable DataLoader."""
import io

import numpy as np
import pytest
import scipy.signal
import torch
from PIL import Image
from skimage import data as skdata

from harmonizer_fast.common import (
    ClickMeDataset,
    ClickMeRecords,
    TFRecordError,
    find_clickme_shards,
    gaussian_kernel,
    load_clickme,
    load_clickme_train,
    load_clickme_val,
    parse_clickme_record,
    read_tfrecord,
    write_clickme_shard,
)
from harmonizer_fast.common import clickme
from harmonizer_fast.common.clickme import jpeg as clickme_jpeg
from harmonizer_fast.common.clickme import loader as clickme_loader
from harmonizer_fast.common.example import decode_example, encode_example

LABELS = [1, 2, 999, 0, 500]
TOKENS = [1.0, 0.0, 0.5, 1.0, 0.25]


def skimage_images():
    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"]
    return np.stack([np.asarray(Image.fromarray(getattr(skdata, n)()).resize((256, 256), Image.BILINEAR))
                     for n in names])


def synthetic_heatmaps(count, size=256):
    """Gaussian blobs at different places (what click maps look like), 0..255 uint8."""
    yy, xx = np.mgrid[:size, :size]
    maps = []
    for i in range(count):
        cy, cx, width = 40 + 40 * i, 200 - 35 * i, 15 + 8 * i
        maps.append(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2)))
    return np.round(np.stack(maps)).astype(np.uint8)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clickme")
    images, heatmaps = skimage_images(), synthetic_heatmaps(len(LABELS))
    write_clickme_shard(root / "train-0.tfrecords", images[:3], heatmaps[:3], np.array(LABELS[:3]), TOKENS[:3])
    write_clickme_shard(root / "train-1.tfrecords", images[3:], heatmaps[3:, :, :, None], np.array(LABELS[3:]),
                        TOKENS[3:])
    return root


def tf_resize_bilinear(x, size):
    """TensorFlow's bilinear resize kernel (half-pixel centres, no antialias) rewritten in NumPy.

    Float32 arithmetic in TF's order: ``in = (out + 0.5) * scale - 0.5`` with
    ``scale = float(in_size) / out_size``, ``lower = max(floor(in), 0)``,
    ``upper = min(ceil(in), in_size - 1)``, ``lerp = in - floor(in)``; columns are
    interpolated first (``a + (b - a) * lerp``), then rows.
    """
    x = np.asarray(x, dtype=np.float32)

    def axis(n_in):
        scale = np.float32(n_in) / np.float32(size)
        src = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        low = np.floor(src)
        lower = np.maximum(low, 0).astype(int)
        upper = np.minimum(np.ceil(src), n_in - 1).astype(int)
        return lower, upper, (src - low).astype(np.float32)

    r0, r1, fr = axis(x.shape[0])
    c0, c1, fc = axis(x.shape[1])
    top = x[r0][:, c0] + (x[r0][:, c1] - x[r0][:, c0]) * fc
    bottom = x[r1][:, c0] + (x[r1][:, c1] - x[r1][:, c0]) * fc
    return top + (bottom - top) * fr[:, None]


def tf_decode_jpeg(data, colorspace):
    """tf.io.decode_jpeg's defaults: libjpeg-turbo, integer-fast IDCT, fancy upsampling."""
    simplejpeg = pytest.importorskip("simplejpeg")
    return simplejpeg.decode_jpeg(data, colorspace=colorspace, fastdct=True, fastupsample=False)


def manual_parse(record):
    """Reference parsing written independently: TF-flag decode, numpy resize, scipy correlation."""
    features = decode_example(record)
    image = tf_decode_jpeg(features["image"].values[0], "RGB").astype(np.float32)
    heatmap = tf_decode_jpeg(features["heatmap"].values[0], "GRAY")[:, :, 0].astype(np.float32)
    image = np.stack([tf_resize_bilinear(image[:, :, c], 224) for c in range(3)])
    small = tf_resize_bilinear(heatmap, 64)
    kernel = gaussian_kernel().numpy().astype(np.float64)
    blurred = scipy.signal.correlate2d(np.pad(small.astype(np.float64), ((4, 5), (4, 5))), kernel, "valid")
    label = np.zeros(1000)
    label[features["label"].values[0]] = 1
    return image, tf_resize_bilinear(blurred, 224), label


def assert_close_255(actual, expected):
    # float32 on 0..255 values: the interpolation formulas differ by float rounding only;
    # absolute slack only near zero
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


def test_parse_matches_manual_computation(shard_dir):
    records = list(read_tfrecord(shard_dir / "train-0.tfrecords")) + list(read_tfrecord(shard_dir / "train-1.tfrecords"))
    for record, label in zip(records, LABELS):
        image, heatmap, one_hot = parse_clickme_record(record)
        assert image.shape == (3, 224, 224) and heatmap.shape == (224, 224) and one_hot.shape == (1000,)
        assert image.dtype == heatmap.dtype == one_hot.dtype == torch.float32
        expected_image, expected_heatmap, expected_label = manual_parse(record)
        assert_close_255(image.numpy(), expected_image)
        assert_close_255(heatmap.numpy(), expected_heatmap)
        np.testing.assert_array_equal(one_hot.numpy(), expected_label)
        assert int(one_hot.argmax()) == label


def jpeg_bytes(array, mode):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pil_decode(data, fast_idct=False):
    with Image.open(io.BytesIO(data)) as image:
        if fast_idct:  # PIL's draft flag: integer-fast IDCT and, for colour, plain upsampling
            image.decoderconfig = (1, 1)
        return np.array(image).astype(int)


def test_jpeg_decoding_follows_tensorflow_defaults(monkeypatch):
    pytest.importorskip("simplejpeg")
    assert clickme_jpeg.jpeg_backend() == "simplejpeg"
    gray = jpeg_bytes(skdata.camera()[:256, :256], "L")
    ours = clickme_jpeg._decode_jpeg(gray, "L", "heatmap")[:, :, 0].astype(int)
    # grayscale has no chroma upsampling, so PIL's draft decode is exactly the fast IDCT
    np.testing.assert_array_equal(ours, pil_decode(gray, fast_idct=True))
    assert np.abs(ours - pil_decode(gray)).max() > 0  # PIL's default (accurate IDCT) differs

    color = jpeg_bytes(skimage_images()[0], "RGB")
    ours = clickme_jpeg._decode_jpeg(color, "RGB", "image").astype(int)
    accurate, plain_upsampling = pil_decode(color), pil_decode(color, fast_idct=True)
    assert 0 < np.abs(ours - accurate).max() <= 8  # only the IDCT differs: a few levels
    assert np.abs(ours - plain_upsampling).max() > 8  # TF keeps the smooth chroma upsampling

    monkeypatch.setattr(clickme_jpeg, "_JPEG_BACKEND", "pil")
    np.testing.assert_array_equal(clickme_jpeg._decode_jpeg(color, "RGB", "image"), accurate)
    png = io.BytesIO()
    Image.fromarray(skdata.camera()[:8, :8]).save(png, format="PNG")
    for backend in clickme_jpeg.JPEG_DECODERS:
        monkeypatch.setattr(clickme_jpeg, "_JPEG_BACKEND", backend)
        with pytest.raises(ValueError, match="image"):
            clickme_jpeg._decode_jpeg(png.getvalue(), "RGB", "image")
        with pytest.raises(ValueError, match="heatmap.*L JPEG"):
            clickme_jpeg._decode_jpeg(color, "L", "heatmap")


def test_parse_with_tokens(shard_dir):
    record = next(iter(read_tfrecord(shard_dir / "train-0.tfrecords")))
    *_, token = parse_clickme_record(record, with_tokens=True)
    assert token.shape == () and float(token) == TOKENS[0]
    features = decode_example(record)
    del features["tokens"]
    without = encode_example(features)
    assert float(parse_clickme_record(without, with_tokens=True)[3]) == 1.0


def collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches(shard_dir, num_workers):
    loader = load_clickme(shard_dir, batch_size=2, num_workers=num_workers, drop_last=False, progress=False)
    batches = collect(loader)
    assert len(batches) == len(loader) == 3
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    labels = []
    for images, heatmaps, one_hot in batches:
        n = images.shape[0]
        assert images.shape == (n, 3, 224, 224) and heatmaps.shape == (n, 224, 224) and one_hot.shape == (n, 1000)
        assert images.dtype == heatmaps.dtype == one_hot.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 255.0 + 1e-3  # bilinear weights round
        torch.testing.assert_close(one_hot.sum(1), torch.ones(n))
        labels += one_hot.argmax(1).tolist()
    assert labels == LABELS  # shard after shard, in file order
    records = ClickMeRecords(shard_dir, progress=False)
    for i, (batch_image, batch_heatmap) in enumerate(zip(torch.cat([b[0] for b in batches]),
                                                         torch.cat([b[1] for b in batches]))):
        expected_image, expected_heatmap, _ = manual_parse(records.read(i))
        assert_close_255(batch_image.numpy(), expected_image)
        assert_close_255(batch_heatmap.numpy(), expected_heatmap)


def test_workers_give_identical_batches_and_drop_last(shard_dir):
    kwargs = dict(batch_size=2, shuffle=True, seed=3, with_tokens=True, progress=False)
    single = collect(load_clickme(shard_dir, num_workers=0, **kwargs))
    assert len(single) == 2  # 5 records, the last partial batch is dropped (drop_remainder=True)
    assert_same_batches(single, collect(load_clickme(shard_dir, num_workers=2, **kwargs)))
    tokens = torch.cat([b[3] for b in single])
    labels = torch.cat([b[2] for b in single]).argmax(1)
    assert [TOKENS[LABELS.index(int(label))] for label in labels] == tokens.tolist()


def test_resume_mid_epoch_and_next_epoch(shard_dir):
    kwargs = dict(batch_size=1, shuffle=True, seed=7, progress=False)
    loader = load_clickme(shard_dir, **kwargs)
    epoch0, epoch1 = collect(loader), collect(loader)
    assert loader.state_dict() == {"epoch": 2, "batch": 0}
    order0 = [int(b[2].argmax()) for b in epoch0]
    order1 = [int(b[2].argmax()) for b in epoch1]
    assert sorted(order0) == sorted(order1) == sorted(LABELS) and order0 != order1

    interrupted = load_clickme(shard_dir, **kwargs)
    for step, _ in enumerate(interrupted):
        if step == 1:
            break
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "batch": 2}
    resumed = load_clickme(shard_dir, **kwargs)
    resumed.load_state_dict(state)
    assert_same_batches(collect(resumed), epoch0[2:])
    assert_same_batches(collect(resumed), epoch1)

    started = load_clickme(shard_dir, start_batch=3, **kwargs)
    assert_same_batches(collect(started), epoch0[3:])
    finished = load_clickme(shard_dir, **kwargs)
    finished.load_state_dict({"epoch": 0, "batch": 5})  # a complete epoch moves on
    assert finished.state_dict() == {"epoch": 1, "batch": 0}


def test_ranks_split_the_global_batches(shard_dir):
    kwargs = dict(batch_size=1, shuffle=True, seed=1, progress=False)
    everything = collect(load_clickme(shard_dir, **kwargs))
    rank0 = collect(load_clickme(shard_dir, rank=0, world_size=2, **kwargs))
    rank1 = collect(load_clickme(shard_dir, rank=1, world_size=2, num_workers=2, **kwargs))
    assert len(rank0) == len(rank1) == 2  # 5 batches cut to 4 so ranks stay in step
    assert_same_batches(rank0, everything[0:4:2])
    assert_same_batches(rank1, everything[1:4:2])


def test_split_loaders_and_shard_discovery(shard_dir, tmp_path):
    loader = load_clickme_train(shard_dir, batch_size=5, progress=False)
    assert len(loader) == 1 and [p.split("/")[-1] for p in loader.dataset.records.paths] == ["train-0.tfrecords",
                                                                                          "train-1.tfrecords"]
    with pytest.raises(FileNotFoundError, match="val.*download_clickme"):
        load_clickme_val(shard_dir)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clickme([shard_dir / "missing.tfrecords"])
    with pytest.raises(ValueError, match="empty"):
        load_clickme([])
    with pytest.raises(TypeError, match="batch_size="):
        load_clickme_train(64)
    for name in ["train-10.tfrecords", "train-2.tfrecords", "clickme_train_1", "val-0.tfrecords", ".train-3.tfrecords.x.tmp"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_clickme_shards(tmp_path, "train")] == [
        "clickme_train_1", "train-2.tfrecords", "train-10.tfrecords"]
    assert [p.name for p in find_clickme_shards(tmp_path, "val")] == ["val-0.tfrecords"]


def test_a_list_of_paths_may_hold_folders(shard_dir, tmp_path):
    # what the command lines pass (--shards DIR, --train-shards DIR): a folder inside the list
    # used to be "not found" although it exists
    extra = tmp_path / "extra.tfrecords"
    extra.write_bytes((shard_dir / "train-0.tfrecords").read_bytes())
    assert [p.name for p in find_clickme_shards([shard_dir, extra])] == [
        "train-0.tfrecords", "train-1.tfrecords", "extra.tfrecords"]
    assert len(ClickMeRecords([shard_dir], progress=False)) == len(LABELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ClickMe shards .* in .*empty"):
        find_clickme_shards([tmp_path / "empty"])


def test_corrupt_record_is_reported_with_its_location(shard_dir, tmp_path):
    path = tmp_path / "train-0.tfrecords"
    data = bytearray((shard_dir / "train-0.tfrecords").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside record 1 (records are similar in size)
    path.write_bytes(bytes(data))
    loader = load_clickme([path], batch_size=1, progress=False)
    with pytest.raises(TFRecordError, match=r"train-0.tfrecords: record 1 ") as info:
        collect(loader)
    assert info.value.index == 1


def test_bad_labels_and_inputs(tmp_path):
    images = np.zeros((1, 8, 8, 3), np.uint8)
    heatmaps = np.zeros((1, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="labels"):
        write_clickme_shard(tmp_path / "a.tfrecords", images, heatmaps, np.array([1000]))
    with pytest.raises(TypeError, match="uint8"):
        write_clickme_shard(tmp_path / "a.tfrecords", images.astype(np.float32), heatmaps, np.array([1]))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        write_clickme_shard(tmp_path / "a.tfrecords", images[..., :2], heatmaps, np.array([1]))
    with pytest.raises(ValueError, match="same number"):
        write_clickme_shard(tmp_path / "a.tfrecords", images, heatmaps, np.array([1, 2]))
    write_clickme_shard(tmp_path / "b.tfrecords", images, heatmaps, np.array([7]))
    record = next(iter(read_tfrecord(tmp_path / "b.tfrecords")))
    with pytest.raises(ValueError, match=r"out of range \[0, 5\)"):
        parse_clickme_record(record, num_classes=5)
    features = decode_example(record)
    features["heatmap"] = features["image"]
    with pytest.raises(ValueError, match="heatmap.*L JPEG"):
        parse_clickme_record(encode_example(features))
    features["heatmap"] = decode_example(record)["heatmap"]
    del features["label"]
    with pytest.raises(ValueError, match="'label'.*missing"):
        parse_clickme_record(encode_example(features))
    with pytest.raises(ValueError, match="batch_size"):
        ClickMeDataset(tmp_path / "b.tfrecords", batch_size=0)


def test_writing_over_an_existing_shard_needs_overwrite(tmp_path):
    images = np.zeros((1, 8, 8, 3), np.uint8)
    heatmaps = np.zeros((1, 8, 8), np.uint8)
    path = tmp_path / "train-0.tfrecords"
    write_clickme_shard(path, images, heatmaps, np.array([7]))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="train-0.tfrecords already exists"):
        write_clickme_shard(path, images + 1, heatmaps, np.array([8]))
    assert path.read_bytes() == before
    write_clickme_shard(path, images, heatmaps, np.array([8]), overwrite=True)
    assert int(parse_clickme_record(next(iter(read_tfrecord(path))))[2].argmax()) == 8


def test_sample_generator_refuses_an_existing_sample(tmp_path):
    make_sample = pytest.importorskip("harmonizer_fast.sample_data.make_sample")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "val-0.tfrecords").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="val-0.tfrecords"):
        make_sample.write_sample(tmp_path)
    with pytest.raises(SystemExit):
        make_sample.main(["--out", str(tmp_path)])
    assert (tmp_path / "val" / "val-0.tfrecords").read_bytes() == b"mine"
    assert not (tmp_path / "train").exists()


def test_a_loader_without_a_single_batch_is_refused(shard_dir):
    count = len(LABELS)
    with pytest.raises(ValueError, match=f"{count} ClickMe record.*`batch_size` {count + 1}.*drop_last=False"):
        load_clickme(shard_dir, batch_size=count + 1, progress=False)
    assert len(load_clickme(shard_dir, batch_size=count + 1, drop_last=False, progress=False)) == 1
    with pytest.raises(ValueError, match=r"per rank \(2 ranks\)"):
        load_clickme(shard_dir, batch_size=count, rank=0, world_size=2, progress=False)


def test_records_plug_into_the_trainer_streams(shard_dir):
    data_mix = pytest.importorskip("harmonizer_fast.training.data_mix")
    records = ClickMeRecords(shard_dir, progress=False)
    assert len(records) == len(LABELS)
    stream = iter(data_mix.ShuffledBatches(records, batch_size=2, seed=0, shuffle=False))
    batch = next(stream)
    assert batch.images.shape == (2, 3, 224, 224) and batch.heatmaps.shape == (2, 224, 224)
    assert batch.labels.argmax(1).tolist() == LABELS[:2] and batch.tokens.tolist() == TOKENS[:2]
    single = records[2]
    assert single.images.shape == (3, 224, 224) and int(single.labels.argmax()) == LABELS[2]
    with pytest.raises(IndexError):
        records.read(len(LABELS))


def test_spawned_workers_use_the_rank_bound_in_the_main_process(shard_dir, monkeypatch):
    kwargs = dict(batch_size=1, progress=False)
    everything = collect(load_clickme(shard_dir, **kwargs))
    # torch.distributed is not initialised in this test: fake it in the main process only;
    # spawned workers start from scratch and see a plain single process
    monkeypatch.setattr(clickme_loader, "_distributed_rank_world", lambda: (1, 2))
    loader = load_clickme(shard_dir, num_workers=1, multiprocessing_context="spawn", **kwargs)
    assert_same_batches(collect(loader), everything[1:4:2])


def test_download_is_resumable_checked_and_atomic(tmp_path):
    """download_clickme against a local file:// "bucket" (no network)."""
    bucket = tmp_path / "bucket" / "val"
    bucket.mkdir(parents=True)
    shard = tmp_path / "one.tfrecords"
    write_clickme_shard(shard, np.zeros((1, 16, 16, 3), np.uint8), np.zeros((1, 16, 16), np.uint8), np.array([3]))
    for i in range(clickme.NB_VAL_SHARDS):
        (bucket / f"val-{i}.tfrecords").write_bytes(shard.read_bytes())
    dest = tmp_path / "dest"
    base_url = (tmp_path / "bucket").as_uri()
    paths = clickme.download_clickme(dest, splits=("val",), base_url=base_url, progress=False)
    assert [p.name for p in paths] == [f"val-{i}.tfrecords" for i in range(clickme.NB_VAL_SHARDS)]
    assert all(p.read_bytes() == shard.read_bytes() for p in paths)
    assert len(load_clickme_val(dest, batch_size=1, progress=False)) == clickme.NB_VAL_SHARDS

    paths[3].write_bytes(shard.read_bytes()[:-3])  # an interrupted earlier download
    damaged = bytearray(shard.read_bytes())
    damaged[-10] ^= 0xFF
    paths[4].write_bytes(bytes(damaged))  # complete headers, a bad data byte
    paths[5].unlink()
    corrupt = bytearray(shard.read_bytes())
    corrupt[40] ^= 0xFF
    (bucket / "val-5.tfrecords").write_bytes(bytes(corrupt))
    with pytest.raises(TFRecordError, match="val-5.tfrecords: record 0"):
        clickme.download_clickme(dest, splits=("val",), base_url=base_url, progress=False)
    assert paths[3].read_bytes() == paths[4].read_bytes() == shard.read_bytes()  # fetched again
    assert not paths[5].exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in paths if p != paths[5])
