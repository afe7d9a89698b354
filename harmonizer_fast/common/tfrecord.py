"""TFRecord files without TensorFlow: CRC32C, framing, a streaming reader, random access, a writer.

A TFRecord file is a sequence of records, each framed as::

    uint64 length            (little-endian)
    uint32 masked_crc(length bytes)
    byte   data[length]
    uint32 masked_crc(data)

with the CRC32C (Castagnoli) checksum masked as ``((crc >> 15) | (crc << 17)) + 0xa282ead8``
(mod 2**32). Both checksums are verified on every read; a bad or truncated record raises
:class:`TFRecordError` naming the file, the record index and its byte offset. Only
uncompressed files are handled (the ClickMe shards are uncompressed).

CRC32C runs in the C++ extension (SSE4.2 instruction, or slicing-by-8 tables) and falls back
to a byte-at-a-time table in Python when the extension is missing.
"""
from __future__ import annotations

import os
import struct
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, List, Optional, Union

import numpy as np

from harmonizer_fast._ext import extension

PathLike = Union[str, "os.PathLike[str]"]
BytesLike = Union[bytes, bytearray, memoryview]

CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reflected
MASK_DELTA = 0xA282EAD8
HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of it
#: largest record this reader accepts. TensorFlow writes records of any size, but a length
#: beyond this is a forged or corrupt field: reading it would try to allocate that much.
MAX_RECORD_BYTES = 1 << 31
#: reads are made in chunks of at most this size, so a lying length on a stream that cannot
#: tell its size fails as a truncated record instead of as one huge allocation.
_READ_CHUNK = 1 << 24
FOOTER_BYTES = 4  # uint32 masked CRC of the data
_U32 = 0xFFFFFFFF


def _make_crc32c_table() -> List[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (CRC32C_POLYNOMIAL if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c_python(data: BytesLike, value: int = 0) -> int:
    """CRC32C of ``data`` in pure Python (one table look-up per byte), extending ``value``.

    The fallback of :func:`crc32c` when the C++ extension is unavailable.
    """
    table = _CRC32C_TABLE
    crc = value ^ _U32
    for byte in memoryview(data).cast("B"):
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc ^ _U32


def crc32c(data: BytesLike, value: int = 0) -> int:
    """CRC32C (Castagnoli) checksum of a bytes-like object.

    ``crc32c(b + c) == crc32c(c, crc32c(b))``: ``value`` continues a running checksum.
    ``crc32c(b"123456789") == 0xE3069283``. Uses the C++ extension (SSE4.2 or slicing-by-8)
    when available, else :func:`crc32c_python`.
    """
    if not 0 <= int(value) <= _U32:
        raise ValueError(f"`value` must be a uint32 CRC, got {value!r}")
    ext = extension()
    if ext is not None:
        return int(ext.crc32c(data, int(value)))
    return crc32c_python(data, int(value))


def mask_crc(crc: int) -> int:
    """TFRecord's masking of a CRC: rotate right by 15 bits, add ``0xa282ead8`` (mod 2**32)."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + MASK_DELTA) & _U32


def masked_crc32c(data: BytesLike) -> int:
    """``mask_crc(crc32c(data))``, the checksum stored in TFRecord framing."""
    return mask_crc(crc32c(data))


class TFRecordError(ValueError):
    """A corrupt or truncated record; ``path``, ``index`` and ``offset`` locate it."""

    def __init__(self, path: PathLike, index: int, offset: int, problem: str):
        self.path = os.fspath(path)
        self.index = index
        self.offset = offset
        self.problem = problem
        super().__init__(
            f"{self.path}: record {index} at byte offset {offset}: {problem}. "
            "The file is corrupt or incomplete; re-download or rewrite it."
        )


def frame_record(data: BytesLike) -> bytes:
    """One record framed as stored in a TFRecord file (header, data, footer)."""
    length = struct.pack("<Q", len(memoryview(data).cast("B")))
    return b"".join((
        length,
        struct.pack("<I", masked_crc32c(length)),
        bytes(data),
        struct.pack("<I", masked_crc32c(data)),
    ))


def _read_exactly(stream: BinaryIO, size: int, path: PathLike, index: int, offset: int, what: str) -> bytes:
    chunks, missing = [], size
    while missing:  # network streams may return short reads before the end
        chunk = stream.read(min(missing, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    if missing:
        raise TFRecordError(path, index, offset, f"truncated {what} (expected {size} bytes, got {size - missing})")
    return b"".join(chunks)


def _parse_header(header: bytes, path: PathLike, index: int, offset: int, check_crc: bool) -> int:
    (length,) = struct.unpack_from("<Q", header, 0)
    if check_crc:
        (stored,) = struct.unpack_from("<I", header, 8)
        computed = masked_crc32c(header[:8])
        if stored != computed:
            raise TFRecordError(
                path, index, offset,
                f"length CRC mismatch (stored 0x{stored:08x}, computed 0x{computed:08x}, length field {length})",
            )
    if length > MAX_RECORD_BYTES:
        raise TFRecordError(
            path, index, offset,
            f"implausible length field {length} (over {MAX_RECORD_BYTES} bytes): the file is corrupt or forged",
        )
    return length


def _bytes_left(stream: BinaryIO) -> Optional[int]:
    """Bytes after the current position of a seekable stream; None for one that cannot seek."""
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def read_record_header(stream: BinaryIO, path: PathLike, index: int, offset: int, check_crc: bool = True) -> int:
    """Read the 12-byte header at ``offset`` of a seekable stream; return the data length."""
    stream.seek(offset)
    return _parse_header(_read_exactly(stream, HEADER_BYTES, path, index, offset, "header"), path, index, offset,
                         check_crc)


def read_record(stream: BinaryIO, path: PathLike, index: int, offset: int, check_crc: bool = True) -> Optional[bytes]:
    """Read and verify the record at the current position of ``stream`` (need not be seekable).

    Args:
        stream: binary stream positioned at a record header.
        path: the stream's file name or URL, for error messages.
        index: the record's position in the file, for error messages.
        offset: byte offset of the record's header, for error messages.
        check_crc: verify both masked CRC32C checksums (leave True unless profiling).

    Returns:
        the record's data bytes, or None at a clean end of file.

    Raises:
        TFRecordError: truncated header or data, or a checksum mismatch.
    """
    first = stream.read(1)
    if not first:
        return None
    header = first + _read_exactly(stream, HEADER_BYTES - 1, path, index, offset, "header")
    length = _parse_header(header, path, index, offset, check_crc)
    remaining = _bytes_left(stream)
    if remaining is not None and remaining < length + FOOTER_BYTES:
        raise TFRecordError(
            path, index, offset,
            f"truncated record: {length} data bytes announced, {max(remaining - FOOTER_BYTES, 0)} left in the file",
        )
    body = _read_exactly(stream, length + FOOTER_BYTES, path, index, offset, f"record of {length} data bytes")
    data = body[:length]
    if check_crc:
        (stored,) = struct.unpack_from("<I", body, length)
        computed = masked_crc32c(data)
        if stored != computed:
            raise TFRecordError(
                path, index, offset, f"data CRC mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
            )
    return data


def read_record_at(stream: BinaryIO, path: PathLike, index: int, offset: int, check_crc: bool = True) -> bytes:
    """Seek to ``offset`` and :func:`read_record` there (an offset at the end of file is an error)."""
    stream.seek(offset)
    data = read_record(stream, path, index, offset, check_crc)
    if data is None:
        raise TFRecordError(path, index, offset, "no record at this offset (end of file)")
    return data


def iter_records(stream: BinaryIO, path: PathLike, check_crc: bool = True) -> Iterator[bytes]:
    """Iterate over the records of an open binary stream (a file, a socket, an HTTP response)."""
    offset, index = 0, 0
    while True:
        data = read_record(stream, path, index, offset, check_crc)
        if data is None:
            return
        yield data
        offset += HEADER_BYTES + len(data) + FOOTER_BYTES
        index += 1


def read_tfrecord(path: PathLike, check_crc: bool = True) -> Iterator[bytes]:
    """Iterate over the data of every record of one TFRecord file, in file order.

    Both checksums of every record are verified; a corrupt or truncated record raises
    :class:`TFRecordError` (a ``ValueError``) naming ``path``, the record index and offset.
    """
    with open(path, "rb") as stream:
        yield from iter_records(stream, path, check_crc)


def index_tfrecord(path: PathLike, check_crc: bool = True) -> np.ndarray:
    """Byte offsets of the records of one file, found by reading only the 12-byte headers.

    The length checksums are verified and a record running past the end of the file raises
    :class:`TFRecordError`; data checksums are verified later, by :func:`read_record_at`.

    Returns:
        (num_records,) int64 array of header offsets.
    """
    offsets = []
    with open(path, "rb") as stream:
        file_size = os.fstat(stream.fileno()).st_size
        offset = 0
        while offset < file_size:
            length = read_record_header(stream, path, len(offsets), offset, check_crc)
            end = offset + HEADER_BYTES + length + FOOTER_BYTES
            if end > file_size:
                raise TFRecordError(
                    path, len(offsets), offset,
                    f"truncated record: {length} data bytes announced, the file ends {end - file_size} bytes early",
                )
            offsets.append(offset)
            offset = end
    return np.asarray(offsets, dtype=np.int64)


class TFRecordWriter:
    """Write records to a TFRecord file, atomically.

    Records go to a temporary file next to ``path``, which replaces ``path`` only when the
    writer is closed without error (``with TFRecordWriter(p) as w: w.write(b"...")``), so a
    crash never leaves a half-written shard under the final name. An existing ``path`` is
    refused with ``FileExistsError`` unless ``overwrite=True`` (checked when the writer opens
    and again before the replace), so a user's shard is never replaced silently.
    """

    def __init__(self, path: PathLike, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = bool(overwrite)
        self._refuse_existing()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a hidden, unique name in the same folder (os.replace must not cross file systems);
        # open(..., "xb") rather than mkstemp, whose 0600 mode would stick to the shard
        self._tmp_path = self.path.parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self._stream: Optional[BinaryIO] = open(self._tmp_path, "xb")
        self.num_records = 0

    def _refuse_existing(self) -> None:
        if not self.overwrite and os.path.lexists(self.path):
            raise FileExistsError(
                f"{self.path} already exists; pass overwrite=True to replace it (nothing was written)"
            )

    def write(self, record: BytesLike) -> None:
        """Append one record (any bytes-like object)."""
        if self._stream is None:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        if not isinstance(record, (bytes, bytearray, memoryview)):
            raise TypeError(f"`record` must be bytes-like, got {type(record).__name__}")
        self._stream.write(frame_record(record))
        self.num_records += 1

    def close(self) -> None:
        """Flush, then move the finished file to ``path``."""
        if self._stream is None:
            return
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._stream = None
        try:
            self._refuse_existing()  # a file may have appeared at ``path`` while writing
        except FileExistsError:
            os.unlink(self._tmp_path)
            raise
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        """Discard what was written; ``path`` is left as it was."""
        if self._stream is None:
            return
        self._stream.close()
        self._stream = None
        os.unlink(self._tmp_path)

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tfrecord(path: PathLike, records: Iterable[BytesLike], overwrite: bool = False) -> int:
    """Write ``records`` to a new TFRecord file at ``path`` (atomically); return how many.

    An existing ``path`` raises ``FileExistsError`` unless ``overwrite=True``.
    """
    with TFRecordWriter(path, overwrite=overwrite) as writer:
        for record in records:
            writer.write(record)
    return writer.num_records
