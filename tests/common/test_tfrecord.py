"""TFRecord framing, CRC32C (C++ and Python) and the hand-written tf.train.Example codec."""
import io
import os
import struct

import numpy as np
import pytest

import harmonizer_fast.common.tfrecord as tfrecord
from harmonizer_fast._ext import HAS_EXTENSION, extension
from harmonizer_fast.common import (
    ExampleDecodeError,
    Feature,
    TFRecordError,
    TFRecordWriter,
    crc32c,
    decode_example,
    encode_example,
    index_tfrecord,
    masked_crc32c,
    read_tfrecord,
    write_tfrecord,
)
from harmonizer_fast.common.tfrecord import crc32c_python, iter_records, read_record_at

# CRC32C check values: RFC 3720 (iSCSI) appendix B.4, and the usual "123456789" check.
CRC_VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"The quick brown fox jumps over the lazy dog", 0x22620404),
]


def crc32c_bitwise(data: bytes) -> int:
    """Bit-at-a-time CRC32C, no table: an independent implementation for the tests."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def implementations():
    impls = [("python", crc32c_python), ("public", crc32c)]
    if HAS_EXTENSION:
        ext = extension()
        impls += [("cpp", ext.crc32c), ("cpp_portable", ext.crc32c_portable)]
    return impls


@pytest.mark.parametrize("name,impl", implementations())
@pytest.mark.parametrize("data,expected", CRC_VECTORS)
def test_crc32c_check_values(name, impl, data, expected):
    assert impl(data) == expected


@pytest.mark.skipif(not HAS_EXTENSION, reason="C++ extension not built")
def test_cpp_and_python_crc_agree_on_random_data():
    ext = extension()
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, size=5000, dtype=np.uint8).tobytes()
    for length in list(range(0, 40)) + [63, 64, 65, 1000, 4093]:
        for start in (0, 1, 3, 7):  # unaligned starts exercise the 8-byte loop's tails
            view = memoryview(blob)[start:start + length]
            expected = crc32c_bitwise(bytes(view))
            assert ext.crc32c(view) == expected
            assert ext.crc32c_portable(view) == expected
            assert crc32c_python(view) == expected
    # chaining: crc(a + b) == crc(b, crc(a))
    assert ext.crc32c(blob[1234:], ext.crc32c(blob[:1234])) == ext.crc32c(blob)
    assert ext.crc32c(blob) == crc32c_python(blob)


def test_python_fallback_when_extension_missing(monkeypatch):
    monkeypatch.setattr(tfrecord, "extension", lambda: None)
    data = bytes(range(256)) * 3
    assert tfrecord.crc32c(data) == crc32c_bitwise(data)
    assert tfrecord.crc32c(data[100:], tfrecord.crc32c(data[:100])) == crc32c_bitwise(data)


def test_crc_rejects_bad_value():
    with pytest.raises(ValueError, match="value"):
        crc32c(b"x", value=1 << 32)


def frame_by_hand(data: bytes) -> bytes:
    """Framing written out from the format description (uint64 length, masked CRCs)."""
    def masked(payload):
        crc = crc32c_bitwise(payload)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked(length)) + data + struct.pack("<I", masked(data))


RECORDS = [b"first record", b"", b"x" * 1000, bytes(range(256))]


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard.tfrecords"
    assert write_tfrecord(path, RECORDS) == len(RECORDS)
    return path


def record_offsets():
    sizes = [12 + len(r) + 4 for r in RECORDS]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


def test_written_bytes_follow_the_format(shard):
    assert shard.read_bytes() == b"".join(frame_by_hand(r) for r in RECORDS)
    assert masked_crc32c(b"123456789") == (((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_round_trip_and_index(shard):
    assert list(read_tfrecord(shard)) == RECORDS
    np.testing.assert_array_equal(index_tfrecord(shard), record_offsets())
    with open(shard, "rb") as stream:
        assert read_record_at(stream, shard, 2, int(record_offsets()[2])) == RECORDS[2]
        assert read_record_at(stream, shard, 0, 0) == RECORDS[0]


class ShortReads(io.RawIOBase):
    """A non-seekable stream returning at most 5 bytes per read (like a socket)."""

    def __init__(self, data):
        self._data, self._pos = data, 0

    def readable(self):
        return True

    def read(self, size=-1):
        size = 5 if size < 0 else min(size, 5)
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk


def test_iter_records_on_a_stream_with_short_reads(shard):
    assert list(iter_records(ShortReads(shard.read_bytes()), "stream")) == RECORDS


def corrupt(path, position, new_byte=None):
    data = bytearray(path.read_bytes())
    data[position] = (data[position] ^ 0x5A) if new_byte is None else new_byte
    path.write_bytes(bytes(data))


def test_corrupt_data_byte_names_file_record_and_offset(shard):
    offset = int(record_offsets()[2])
    corrupt(shard, offset + 12 + 500)
    with pytest.raises(TFRecordError) as info:
        list(read_tfrecord(shard))
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.index, err.offset) == (str(shard), 2, offset)
    assert str(shard) in str(err) and "record 2" in str(err) and f"offset {offset}" in str(err)
    assert "data CRC" in str(err)
    # the index reads headers only, so it does not see a data error
    np.testing.assert_array_equal(index_tfrecord(shard), record_offsets())


def test_corrupt_data_crc_itself(shard):
    offset = int(record_offsets()[1])
    corrupt(shard, offset + 12 + 0)  # record 1 is empty: its first footer byte
    with pytest.raises(TFRecordError, match="record 1 .*data CRC"):
        list(read_tfrecord(shard))


def test_corrupt_length_crc(shard):
    offset = int(record_offsets()[1])
    corrupt(shard, offset + 9)
    for reader in (lambda p: list(read_tfrecord(p)), index_tfrecord):
        with pytest.raises(TFRecordError, match="length CRC") as info:
            reader(shard)
        assert (info.value.index, info.value.offset) == (1, offset)


def test_corrupt_length_field(shard):
    offset = int(record_offsets()[3])
    corrupt(shard, offset + 2)  # the length changes, its CRC no longer matches
    with pytest.raises(TFRecordError, match="record 3 .*length CRC"):
        index_tfrecord(shard)


@pytest.mark.parametrize("cut", [3, 12 + 100, 12 + 256 + 2])
def test_truncated_file(shard, cut):
    offset = int(record_offsets()[3])
    shard.write_bytes(shard.read_bytes()[:offset + cut])
    for reader in (lambda p: list(read_tfrecord(p)), index_tfrecord):
        with pytest.raises(TFRecordError, match="truncated") as info:
            reader(shard)
        assert (info.value.index, info.value.offset) == (3, offset)
        assert str(shard) in str(info.value)


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "out.tfrecords"
    with pytest.raises(RuntimeError):
        with TFRecordWriter(path) as writer:
            writer.write(b"partial")
            raise RuntimeError("interrupted")
    assert not path.exists()
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="bytes-like"):
        with TFRecordWriter(path) as writer:
            writer.write("text")
    with TFRecordWriter(path) as writer:
        writer.write(bytearray(b"ok"))
    assert list(read_tfrecord(path)) == [b"ok"] and os.listdir(tmp_path) == ["out.tfrecords"]


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "mine.tfrecords"
    write_tfrecord(path, [b"user data"])
    with pytest.raises(FileExistsError, match="mine.tfrecords already exists.*overwrite=True"):
        write_tfrecord(path, [b"other"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TFRecordWriter(path)
    assert list(read_tfrecord(path)) == [b"user data"] and os.listdir(tmp_path) == ["mine.tfrecords"]
    # a file that appears while the writer is open is not replaced either
    late = tmp_path / "late.tfrecords"
    with pytest.raises(FileExistsError):
        with TFRecordWriter(late) as writer:
            writer.write(b"new")
            late.write_bytes(b"someone else's")
    assert late.read_bytes() == b"someone else's" and sorted(os.listdir(tmp_path)) == ["late.tfrecords", "mine.tfrecords"]
    assert write_tfrecord(path, [b"other"], overwrite=True) == 1
    assert list(read_tfrecord(path)) == [b"other"]


# ----------------------------------------------------------------------------- tf.train.Example
def ld(field, payload):
    """A length-delimited field, assembled byte by byte (payloads here are < 128 bytes)."""
    assert len(payload) < 128
    return bytes([(field << 3) | 2, len(payload)]) + payload


def example_bytes(entries):
    return ld(1, b"".join(ld(1, ld(1, name) + ld(2, feature)) for name, feature in entries))


def test_decoder_on_hand_assembled_bytes():
    packed_label = ld(3, ld(1, b"\x03"))  # Int64List, packed [3]
    # Int64List, unpacked: 5, then -1 as ten varint bytes, then 300 (0xAC 0x02)
    unpacked_ints = ld(3, b"\x08\x05" + b"\x08" + b"\xff" * 9 + b"\x01" + b"\x08\xac\x02")
    unpacked_floats = ld(2, b"\x0d" + struct.pack("<f", 1.5) + b"\x0d" + struct.pack("<f", -0.25))
    packed_floats = ld(2, ld(1, struct.pack("<3f", 0.5, 2.0, -8.0)))
    two_bytes = ld(1, ld(1, b"jpeg") + ld(1, b""))
    with_unknown = b"\x38\x07" + ld(3, ld(1, b"\x2a"))  # unknown varint field 7 of Feature, then [42]
    data = example_bytes([
        (b"label", packed_label), (b"ints", unpacked_ints), (b"uf", unpacked_floats),
        (b"pf", packed_floats), (b"image", two_bytes), (b"skip", with_unknown),
    ])
    data += b"\x79" + bytes(8)  # unknown fixed64 field 15 of Example
    decoded = decode_example(data)
    assert decoded == {
        "label": Feature("int64_list", (3,)),
        "ints": Feature("int64_list", (5, -1, 300)),
        "uf": Feature("float_list", (1.5, -0.25)),
        "pf": Feature("float_list", (0.5, 2.0, -8.0)),
        "image": Feature("bytes_list", (b"jpeg", b"")),
        "skip": Feature("int64_list", (42,)),
    }


def test_encoder_writes_the_canonical_bytes():
    data = encode_example({"label": 3, "image": b"jpeg", "f": 0.5})
    expected = example_bytes([
        (b"label", ld(3, ld(1, b"\x03"))),
        (b"image", ld(1, ld(1, b"jpeg"))),
        (b"f", ld(2, ld(1, struct.pack("<f", 0.5)))),
    ])
    assert data == expected


def test_round_trip_extremes():
    rng = np.random.default_rng(1)
    floats = rng.normal(size=20).astype(np.float32)
    features = {
        "ints": [-(1 << 63), -1, 0, 1, (1 << 63) - 1, 300],
        "floats": floats,
        "blobs": [rng.bytes(200), b"", b"\x00\xff"],
        "text": "héllo",
        "empty": Feature("int64_list", ()),
    }
    decoded = decode_example(encode_example(features))
    assert decoded["ints"] == Feature("int64_list", tuple(features["ints"]))
    np.testing.assert_array_equal(np.array(decoded["floats"].values, dtype=np.float32), floats)
    assert decoded["blobs"].values == tuple(features["blobs"])
    assert decoded["text"].values == ("héllo".encode(),)
    assert decoded["empty"] == Feature("int64_list", ())  # the oneof is set, to an empty list


def _protobuf_example_class():
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="hf_test_example.proto", package="hftest", syntax="proto3")

    def message(name, fields):
        msg = proto.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return msg

    rep, opt, msg_t = field.LABEL_REPEATED, field.LABEL_OPTIONAL, field.TYPE_MESSAGE
    message("BytesList", [("value", 1, field.TYPE_BYTES, rep, None)])
    message("FloatList", [("value", 1, field.TYPE_FLOAT, rep, None)])
    message("Int64List", [("value", 1, field.TYPE_INT64, rep, None)])
    feature = message("Feature", [("bytes_list", 1, msg_t, opt, ".hftest.BytesList"),
                                  ("float_list", 2, msg_t, opt, ".hftest.FloatList"),
                                  ("int64_list", 3, msg_t, opt, ".hftest.Int64List")])
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message("Features", [("feature", 1, msg_t, rep, ".hftest.Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=msg_t, label=opt, type_name=".hftest.Feature")
    message("Example", [("features", 1, msg_t, opt, ".hftest.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("hftest.Example"))


def test_agrees_with_the_protobuf_library():
    example_class = _protobuf_example_class()
    reference = example_class()
    reference.features.feature["image"].bytes_list.value.extend([b"\xff\xd8jpeg", b"second"])
    reference.features.feature["label"].int64_list.value.extend([999, -7])
    reference.features.feature["tokens"].float_list.value.append(0.1)
    ours = decode_example(reference.SerializeToString())
    assert ours["image"] == Feature("bytes_list", (b"\xff\xd8jpeg", b"second"))
    assert ours["label"] == Feature("int64_list", (999, -7))
    assert ours["tokens"] == Feature("float_list", (float(np.float32(0.1)),))

    parsed = example_class()
    parsed.ParseFromString(encode_example({"image": [b"a", b"bc"], "label": [-(1 << 63), 5], "f": [0.1, 3.0]}))
    feature = parsed.features.feature
    assert list(feature["image"].bytes_list.value) == [b"a", b"bc"]
    assert list(feature["label"].int64_list.value) == [-(1 << 63), 5]
    assert list(feature["f"].float_list.value) == pytest.approx([0.1, 3.0], rel=1e-7)


@pytest.mark.parametrize("data,message", [
    (b"\x0a\x05\x0a\x03", "runs past the end"),
    (b"\x0a\x02\x0a\x80", "truncated varint"),
    (b"\x0b", "wire type 3"),
    (b"\x08", "truncated varint"),
    (b"\x0a" + b"\xff" * 11, "longer than 10 bytes"),
])
def test_malformed_examples_raise(data, message):
    with pytest.raises(ExampleDecodeError, match=message):
        decode_example(data)


def test_packed_float_length_must_be_multiple_of_four():
    data = example_bytes([(b"f", ld(2, ld(1, b"\x00\x00\x80")))])
    with pytest.raises(ValueError, match="multiple of 4"):
        decode_example(data)


def test_encoder_rejects_bad_values():
    with pytest.raises(ValueError, match="empty list"):
        encode_example({"x": []})
    with pytest.raises(ValueError, match="int64"):
        encode_example({"x": [1 << 63]})
    with pytest.raises(ValueError, match="unknown kind"):
        encode_example({"x": Feature("string_list", ("a",))})
    with pytest.raises(TypeError, match="mapping"):
        encode_example([("x", 1)])
    with pytest.raises(ValueError, match="float32"):
        encode_example({"x": [1e39]})


def test_written_file_has_default_permissions(tmp_path):
    path = tmp_path / "perm.tfrecords"
    write_tfrecord(path, [b"x"])
    reference = tmp_path / "plain"
    reference.write_bytes(b"")
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)
