"""The framing kura-py peers use to move many artifacts in one HTTP body.

Kura's per-artifact routes (``PUT /_internal/replicate/artifact``, ``GET
/_internal/bootstrap/artifacts/{id}``) cost one request per artifact, which bounds a
Python node at a few thousand small artifacts per second. kura-py peers also speak
``POST /_internal/replicate/batch`` (outbox delivery) and ``POST
/_internal/bootstrap/bodies`` (bootstrap), whose bodies are a sequence of frames::

    frame  = header_length (4 bytes, big-endian) | header (JSON object) | body
    body   = exactly header["size"] bytes for an ``artifact`` frame, nothing otherwise

Header ``t`` is ``artifact`` (with the manifest fields: producer, namespace_id, key,
content_type, inline, size, version_ms, origin, and headers when it has any) or
``missing`` (bootstrap: the requested id is no longer held; ``artifact_id``). The stream
ends at a frame boundary; ending anywhere else is a truncated transfer and nothing of it
is applied.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterator

from app.errors import BadRequest, TruncatedBody
from app.storage.catalog import ManifestEntry
from app.storage.store import ArtifactStore, Located

MAX_HEADER_BYTES = 64 * 1024
BODY_CHUNK = 1024 * 1024
FRAMES_CONTENT_TYPE = "application/x-kura-frames"
_LENGTH = struct.Struct(">I")


def encode_header(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTH.pack(len(raw)) + raw


class FrameReader:
    """Reads frames from ``read(n)`` (a file-like ``read``: fewer bytes only at EOF or when
    the stream has less ready; ``b""`` at the end)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.bytes_read = 0

    def _exactly(self, n: int, what: str) -> bytes:
        parts = []
        left = n
        while left:
            chunk = self._read(left)
            if not chunk:
                raise TruncatedBody(f"Incomplete frame stream: {what} ended early")
            parts.append(chunk)
            left -= len(chunk)
        self.bytes_read += n
        return b"".join(parts)

    def headers(self) -> Iterator[dict[str, Any]]:
        """Each frame's header; the caller must consume the body (``copy_body``) before
        asking for the next one."""
        while True:
            first = self._read(_LENGTH.size)
            if not first:
                return
            self.bytes_read += len(first)
            if len(first) < _LENGTH.size:
                first += self._exactly(_LENGTH.size - len(first), "frame length")
            (length,) = _LENGTH.unpack(first)
            if not 0 < length <= MAX_HEADER_BYTES:
                raise BadRequest("Invalid frame: header length out of range")
            try:
                header = json.loads(self._exactly(length, "frame header"))
            except (UnicodeDecodeError, ValueError):
                raise BadRequest("Invalid frame: header is not JSON") from None
            if not isinstance(header, dict):
                raise BadRequest("Invalid frame: header is not a JSON object")
            yield header

    def copy_body(self, size: int, sink: Callable[[bytes], None], chunk: int = 1024 * 1024) -> None:
        """Pass exactly ``size`` body bytes to ``sink``."""
        left = size
        while left:
            data = self._read(min(chunk, left))
            if not data:
                raise TruncatedBody(f"Incomplete frame stream: body ended {left} bytes early")
            sink(data)
            left -= len(data)
            self.bytes_read += len(data)


class BodyStream:
    """The frames of bodies served to a peer, with their total length known up front.

    Segment files are opened before the first byte is sent, so an eviction meanwhile
    cannot cut a body short."""

    def __init__(self, store: ArtifactStore, located: list[tuple[str, Located | None]],
                 chunk: int = BODY_CHUNK, pace: Callable[[int], None] = lambda n: None) -> None:
        """``pace(n)`` is called before each chunk of ``n`` bytes leaves (bandwidth pacing)."""
        self._store = store
        self._chunk = chunk
        self._pace = pace
        self._items: list[tuple[bytes, Located | None, Any]] = []
        self.length = 0
        try:
            for hex_id, found in located:
                if found is None:
                    header = encode_header({"t": "missing", "artifact_id": hex_id})
                    fh = None
                else:
                    header = encode_header({**ManifestEntry(hex_id, found.manifest).to_json(),
                                            "t": "artifact"})
                    fh = (store.open_body(found) if not found.manifest.inline and found.size
                          else None)
                self._items.append((header, found, fh))
                self.length += len(header) + (found.size if found is not None else 0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the segment files (idempotent; the frames generator also does it)."""
        for _, _, fh in self._items:
            if fh is not None:
                fh.close()

    def frames(self, *, with_headers: bool = True) -> Iterator[bytes]:
        try:
            for header, found, fh in self._items:
                if with_headers:
                    yield header
                if found is None or not found.size:
                    continue
                if fh is None:
                    self._pace(found.size)
                    yield self._store.read_bytes(found)
                    continue
                sent = 0
                while sent < found.size:
                    data = os.pread(fh.fileno(), min(self._chunk, found.size - sent),
                                    found.manifest.offset + sent)
                    if not data:
                        raise OSError(f"segment ended {found.size - sent} bytes early")
                    sent += len(data)
                    self._pace(len(data))
                    yield data
        finally:
            self.close()
