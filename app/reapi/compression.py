"""REAPI blob compression: the compressors served (identity and zstd) and streaming (de)compression.

Blobs are stored uncompressed, so a digest always names the stored bytes, reads
can honour offsets and the HTTP side serves them with sendfile; zstd exists on the
wire only. Nothing here holds a whole blob: compression and decompression work
chunk by chunk with zstd's bounded window, and decompressed output is capped at
the size the digest announces (a zstd bomb stops there).
"""
from __future__ import annotations

import threading
from typing import Iterable, Iterator, Protocol

import zstandard

from app.errors import BadRequest, TooLarge
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

IDENTITY = "identity"
ZSTD = "zstd"
# Resource-name spelling (lower-case Compressor.Value) -> enum value, for what we serve.
COMPRESSORS = {IDENTITY: re_pb2.Compressor.IDENTITY, ZSTD: re_pb2.Compressor.ZSTD}
_NAMES = {value: name for name, value in COMPRESSORS.items()}
# Advertised in CacheCapabilities (REAPI lists the compressors other than identity).
ADVERTISED = [re_pb2.Compressor.ZSTD]
# zstd level for reads: fast; the data is often already compressed.
READ_LEVEL = 1
# Output chunk of the decompressor (bounds the memory a decompressing write holds).
DECOMPRESSED_CHUNK_BYTES = 256 * 1024


class CorruptCompressedData(BadRequest):
    """The bytes sent are not a valid stream of the named compressor."""


class Sink(Protocol):
    def write(self, chunk: bytes) -> None: ...


def compressor_from_name(name: str) -> str:
    """A compressor named in a resource name (BadRequest if not served)."""
    if name not in COMPRESSORS:
        raise BadRequest(f"Unsupported compressor {name[:40]!r} in resource name")
    return name


def compressor_from_enum(value: int) -> str:
    """A ``Compressor.Value`` from a batch request (BadRequest if not served)."""
    name = _NAMES.get(value)
    if name is None:
        raise BadRequest(f"Unsupported compressor {value}")
    return name


def to_enum(name: str) -> int:
    return COMPRESSORS[name]


class Decompressing:
    """Writes the decompressed form of a zstd stream, fed in pieces, to ``sink``.

    Several concatenated frames are one stream. ``CorruptCompressedData`` for
    bytes that are not zstd.
    """

    def __init__(self, sink: Sink) -> None:
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            _SinkAdapter(sink), write_size=DECOMPRESSED_CHUNK_BYTES, closefd=False)

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        try:
            self._writer.write(chunk)
        except zstandard.ZstdError as exc:
            raise CorruptCompressedData(f"Invalid zstd data: {exc}") from None


class _SinkAdapter:
    """What ``stream_writer`` wants of its destination."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink.write(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class _BoundedBuffer:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLarge(f"Decompressed data is larger than the {self.limit} bytes announced")
        self.parts.append(chunk)


def decompress_bounded(data: bytes, limit: int) -> bytes:
    """A small zstd payload (a batch entry) decompressed, at most ``limit`` bytes."""
    buffer = _BoundedBuffer(limit)
    Decompressing(buffer).write(data)
    return b"".join(buffer.parts)


# One compressor per thread (a ZstdCompressor is not for concurrent use), kept: a batch
# read compresses up to a thousand small blobs, and making one cost more than using it.
_per_thread = threading.local()


def compress(data: bytes) -> bytes:
    """A small blob (a batch entry) as one zstd frame."""
    compressor = getattr(_per_thread, "compressor", None)
    if compressor is None:
        compressor = _per_thread.compressor = zstandard.ZstdCompressor(level=READ_LEVEL)
    return compressor.compress(data)


def compress_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The zstd stream of ``chunks``, produced as they arrive (one frame)."""
    compressor = zstandard.ZstdCompressor(level=READ_LEVEL).compressobj()
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()
