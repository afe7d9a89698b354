"""A hand-written ``tf.train.Example`` encoder/decoder (protobuf wire format, no dependency).

The messages (``tensorflow/core/example/{example,feature}.proto``)::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }      // entries: key = 1, value = 2
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

Wire format: each field is a varint key ``(field_number << 3) | wire_type`` followed by a
varint (type 0), 8 bytes (1), a varint length and that many bytes (2) or 4 bytes (5).
The encoder writes packed lists (what TensorFlow writes); the decoder reads packed and
unpacked lists, skips unknown fields, merges repeated occurrences like protobuf does
(later scalar/oneof values win, repeated values concatenate) and rejects malformed input
with :class:`ExampleDecodeError`.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

WIRE_VARINT, WIRE_FIXED64, WIRE_LENGTH_DELIMITED, WIRE_FIXED32 = 0, 1, 2, 5
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_U64 = (1 << 64) - 1


class ExampleDecodeError(ValueError):
    """Malformed ``tf.train.Example`` bytes (``position`` is the byte offset of the problem)."""

    def __init__(self, message: str, position: int):
        self.position = position
        super().__init__(f"malformed tf.train.Example at byte {position}: {message}")


class Feature(NamedTuple):
    """One feature: ``kind`` is ``"bytes_list"``, ``"float_list"``, ``"int64_list"`` or None (unset)."""

    kind: Optional[str]
    values: Tuple


FeatureInput = Union[Feature, bytes, str, int, float, Sequence, np.ndarray]


# ----------------------------------------------------------------------------- wire primitives
def encode_varint(value: int) -> bytes:
    """Base-128 varint of an unsigned value below 2**64 (low groups first, high bit = more)."""
    if not 0 <= value <= _U64:
        raise ValueError(f"varint value must be in [0, 2**64), got {value}")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def decode_varint(buffer: memoryview, position: int, end: int) -> Tuple[int, int]:
    """Read a varint at ``position``; return (value, next position)."""
    value, shift = 0, 0
    while True:
        if position >= end:
            raise ExampleDecodeError("truncated varint", position)
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise ExampleDecodeError("varint longer than 10 bytes", position)
    return value & _U64, position


def _key(field_number: int, wire_type: int) -> bytes:
    return encode_varint((field_number << 3) | wire_type)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _key(field_number, WIRE_LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


def iter_fields(buffer: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, object, int]]:
    """Yield ``(field_number, wire_type, value, position)`` for each field in ``buffer[start:end]``.

    ``value`` is an int for varint fields, a ``(start, end)`` span for length-delimited ones
    and the raw little-endian bytes for fixed32/fixed64 ones.
    """
    position = start
    while position < end:
        field_start = position
        key, position = decode_varint(buffer, position, end)
        field_number, wire_type = key >> 3, key & 7
        if field_number == 0:
            raise ExampleDecodeError("field number 0", field_start)
        if wire_type == WIRE_VARINT:
            value, position = decode_varint(buffer, position, end)
        elif wire_type == WIRE_LENGTH_DELIMITED:
            length, position = decode_varint(buffer, position, end)
            if position + length > end:
                raise ExampleDecodeError(f"length {length} runs past the end of its message", position)
            value, position = (position, position + length), position + length
        elif wire_type in (WIRE_FIXED32, WIRE_FIXED64):
            size = 4 if wire_type == WIRE_FIXED32 else 8
            if position + size > end:
                raise ExampleDecodeError(f"truncated fixed{size * 8} field", position)
            value, position = bytes(buffer[position:position + size]), position + size
        else:
            raise ExampleDecodeError(f"unsupported wire type {wire_type} (field {field_number})", field_start)
        yield field_number, wire_type, value, field_start


# ----------------------------------------------------------------------------- list codecs
def _signed64(value: int) -> int:
    return value - (1 << 64) if value > _INT64_MAX else value


def _encode_bytes_list(values: Sequence) -> bytes:
    return b"".join(_length_delimited(1, bytes(value)) for value in values)


def _encode_float_list(values: Sequence) -> bytes:
    if not len(values):
        return b""
    return _length_delimited(1, np.asarray(values, dtype="<f4").tobytes())


def _encode_int64_list(values: Sequence) -> bytes:
    if not len(values):
        return b""
    return _length_delimited(1, b"".join(encode_varint(int(value) & _U64) for value in values))


def _decode_list(buffer: memoryview, start: int, end: int, name: str, unpacked_wire_type: Optional[int],
                 unpacked: Optional[Callable], packed: Callable) -> List:
    """Values of field 1 of a list message; each occurrence is either one unpacked value
    (``unpacked_wire_type``) or a length-delimited span that ``packed`` turns into values."""
    values: List = []
    for field_number, wire_type, value, position in iter_fields(buffer, start, end):
        if field_number != 1:
            continue
        if wire_type == WIRE_LENGTH_DELIMITED:
            values.extend(packed(buffer, value[0], value[1], position))
        elif wire_type == unpacked_wire_type:
            values.append(unpacked(value))
        else:
            raise ExampleDecodeError(f"{name}.value has unexpected wire type {wire_type}", position)
    return values


def _bytes_span(buffer: memoryview, start: int, end: int, position: int) -> List[bytes]:
    return [bytes(buffer[start:end])]


def _packed_floats(buffer: memoryview, start: int, end: int, position: int) -> List[float]:
    if (end - start) % 4:
        raise ExampleDecodeError(f"packed FloatList of {end - start} bytes (not a multiple of 4)", position)
    return np.frombuffer(buffer[start:end], dtype="<f4").tolist()


def _packed_int64s(buffer: memoryview, start: int, end: int, position: int) -> List[int]:
    values = []
    while start < end:
        item, start = decode_varint(buffer, start, end)
        values.append(_signed64(item))
    return values


def _decode_bytes_list(buffer: memoryview, start: int, end: int) -> List:
    return _decode_list(buffer, start, end, "BytesList", None, None, _bytes_span)


def _decode_float_list(buffer: memoryview, start: int, end: int) -> List:
    return _decode_list(buffer, start, end, "FloatList", WIRE_FIXED32, lambda raw: struct.unpack("<f", raw)[0],
                        _packed_floats)


def _decode_int64_list(buffer: memoryview, start: int, end: int) -> List:
    return _decode_list(buffer, start, end, "Int64List", WIRE_VARINT, _signed64, _packed_int64s)


class _KindCodec(NamedTuple):
    field_number: int
    encode: Callable[[Sequence], bytes]
    decode: Callable[[memoryview, int, int], List]


#: Feature.kind -> its oneof field number in ``Feature`` and the codecs of its list message.
FEATURE_KINDS: Dict[str, _KindCodec] = {
    "bytes_list": _KindCodec(1, _encode_bytes_list, _decode_bytes_list),
    "float_list": _KindCodec(2, _encode_float_list, _decode_float_list),
    "int64_list": _KindCodec(3, _encode_int64_list, _decode_int64_list),
}
_KIND_BY_FIELD = {codec.field_number: kind for kind, codec in FEATURE_KINDS.items()}


# ----------------------------------------------------------------------------- feature values
def _infer_kind(name: str, value: FeatureInput) -> Feature:
    """Turn a Python/NumPy value into a :class:`Feature` (bytes, str, int, float or sequences of them)."""
    if isinstance(value, Feature):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "iub":
            return Feature("int64_list", tuple(int(v) for v in value.ravel()))
        if value.dtype.kind == "f":
            return Feature("float_list", tuple(float(v) for v in value.ravel()))
        raise TypeError(f"feature {name!r}: unsupported array dtype {value.dtype}")
    items = [value] if isinstance(value, (bytes, bytearray, memoryview, str, int, float, np.generic)) else list(value)
    if not items:
        raise ValueError(f"feature {name!r}: an empty list has no kind; pass Feature(kind, ()) explicitly")
    first = items[0]
    if isinstance(first, (bytes, bytearray, memoryview, str)):
        kind = "bytes_list"
        items = [item.encode("utf-8") if isinstance(item, str) else bytes(item) for item in items]
    elif isinstance(first, (int, np.integer)):
        kind = "int64_list"
    elif isinstance(first, (float, np.floating)):
        kind = "float_list"
    else:
        raise TypeError(f"feature {name!r}: cannot encode values of type {type(first).__name__}")
    return Feature(kind, tuple(items))


def _validate_feature(name: str, feature: Feature) -> None:
    if feature.kind is None:
        if feature.values:
            raise ValueError(f"feature {name!r}: values given without a kind")
        return
    if feature.kind not in FEATURE_KINDS:
        raise ValueError(f"feature {name!r}: unknown kind {feature.kind!r}; expected one of {sorted(FEATURE_KINDS)}")
    if feature.kind == "int64_list":
        for value in feature.values:
            if isinstance(value, (float, np.floating)) or not _INT64_MIN <= int(value) <= _INT64_MAX:
                raise ValueError(f"feature {name!r}: {value!r} is not an int64")
    elif feature.kind == "float_list":
        for value in feature.values:
            if isinstance(value, (bytes, str)) or (math.isfinite(float(value)) and abs(float(value)) > 3.4028235e38):
                raise ValueError(f"feature {name!r}: {value!r} is not representable as float32")
    else:
        for value in feature.values:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"feature {name!r}: bytes_list values must be bytes, got {type(value).__name__}")


# ----------------------------------------------------------------------------- Example
def encode_feature(feature: Feature) -> bytes:
    """Serialized ``Feature`` message (the list packed for numbers)."""
    if feature.kind is None:
        return b""
    codec = FEATURE_KINDS[feature.kind]
    return _length_delimited(codec.field_number, codec.encode(feature.values))


def encode_example(features: Mapping[str, FeatureInput]) -> bytes:
    """Serialize a ``tf.train.Example`` from ``{name: value}``.

    Values may be :class:`Feature` instances, or plain values whose kind is inferred:
    bytes/str (UTF-8) -> ``bytes_list``, int -> ``int64_list``, float -> ``float_list``,
    sequences or NumPy arrays of those. Map entries are written in the mapping's order.
    """
    if not isinstance(features, Mapping):
        raise TypeError(f"`features` must be a mapping name -> value, got {type(features).__name__}")
    entries = []
    for name, value in features.items():
        if not isinstance(name, str):
            raise TypeError(f"feature names must be str, got {type(name).__name__}")
        feature = _infer_kind(name, value)
        _validate_feature(name, feature)
        entry = _length_delimited(1, name.encode("utf-8")) + _length_delimited(2, encode_feature(feature))
        entries.append(_length_delimited(1, entry))
    return _length_delimited(1, b"".join(entries))


def _decode_feature(buffer: memoryview, start: int, end: int) -> Feature:
    kind: Optional[str] = None
    values: List = []
    for field_number, wire_type, value, position in iter_fields(buffer, start, end):
        field_kind = _KIND_BY_FIELD.get(field_number)
        if field_kind is None:
            continue
        if wire_type != WIRE_LENGTH_DELIMITED:
            raise ExampleDecodeError(f"Feature.{field_kind} has wire type {wire_type}, expected 2", position)
        decoded = FEATURE_KINDS[field_kind].decode(buffer, *value)
        # protobuf merge rules: a repeated occurrence of the same message extends it,
        # another member of the oneof replaces it
        values = values + decoded if field_kind == kind else decoded
        kind = field_kind
    return Feature(kind, tuple(values))


def _decode_map_entry(buffer: memoryview, start: int, end: int) -> Tuple[str, Feature]:
    name, feature = "", Feature(None, ())
    for field_number, wire_type, value, position in iter_fields(buffer, start, end):
        if field_number not in (1, 2):
            continue
        if wire_type != WIRE_LENGTH_DELIMITED:
            raise ExampleDecodeError(f"map entry field {field_number} has wire type {wire_type}, expected 2", position)
        if field_number == 1:
            try:
                name = bytes(buffer[value[0]:value[1]]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ExampleDecodeError("feature name is not UTF-8", position) from exc
        else:
            feature = _decode_feature(buffer, *value)
    return name, feature


def decode_example(data: Union[bytes, bytearray, memoryview]) -> Dict[str, Feature]:
    """Parse serialized ``tf.train.Example`` bytes into ``{name: Feature(kind, values)}``.

    ``bytes_list`` values are ``bytes``, ``int64_list`` values Python ints (two's complement
    64-bit), ``float_list`` values Python floats (exact float32 values).
    """
    buffer = memoryview(data).cast("B")
    features: Dict[str, Feature] = {}
    for field_number, wire_type, value, position in iter_fields(buffer, 0, len(buffer)):
        if field_number != 1:
            continue
        if wire_type != WIRE_LENGTH_DELIMITED:
            raise ExampleDecodeError(f"Example.features has wire type {wire_type}, expected 2", position)
        for entry_number, entry_type, span, entry_position in iter_fields(buffer, *value):
            if entry_number != 1:
                continue
            if entry_type != WIRE_LENGTH_DELIMITED:
                raise ExampleDecodeError(f"Features.feature has wire type {entry_type}, expected 2", entry_position)
            name, feature = _decode_map_entry(buffer, *span)
            features[name] = feature
    return features
