"""The manifest: what the node knows about one artifact, stored under its 32-byte id."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from app.errors import BadRequest

MAX_STORED_HEADERS = 8
MAX_STORED_HEADER_VALUE = 1024
_HEADER_NAME = re.compile(r"[a-z0-9-]{1,64}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")  # printable ASCII: nothing a response could split on

_raw_decode_json = json.JSONDecoder().raw_decode
# Recently decoded manifests by their stored bytes (a manifest is immutable, so the same
# bytes are the same manifest): hot artifacts are read far more often than they change.
DECODED_KEPT = 4096
_decoded: dict[bytes, "Manifest"] = {}
_encode_json = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds one per call


@dataclass(frozen=True)
class Manifest:
    producer: str
    namespace_id: str
    key: str
    content_type: str
    version_ms: int
    size: int
    segment_id: int = 0  # 0: the body is stored inline in LMDB
    offset: int = 0
    origin: str = ""  # node URL that made this version (breaks version_ms ties)
    # Response headers the protocol kept from the upload (Turborepo's ``x-artifact-duration``
    # and ``x-artifact-tag``): part of the version, replicated with it, sent with every
    # download of it.
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def inline(self) -> bool:
        return self.segment_id == 0

    @property
    def order(self) -> tuple[int, str]:
        """Position in last-writer-wins order: see ``version_order``."""
        return version_order(self.version_ms, self.origin)

    def encode(self) -> bytes:
        doc = {"p": self.producer, "n": self.namespace_id, "k": self.key,
               "ct": self.content_type, "v": self.version_ms, "s": self.size}
        if self.segment_id:
            doc["seg"] = self.segment_id
            doc["off"] = self.offset
        if self.origin:
            doc["o"] = self.origin
        if self.headers:
            doc["h"] = dict(self.headers)
        return _encode_json(doc).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Manifest":
        raw = bytes(raw)
        found = _decoded.get(raw)
        if found is not None:
            return found
        text = raw.decode()
        doc, end = _raw_decode_json(text)  # json.loads would sniff the encoding first
        if end != len(text):
            raise ValueError(f"trailing data after a manifest at {end}")
        headers = doc.get("h")
        manifest = _built(cls, {
            "producer": doc["p"], "namespace_id": doc["n"], "key": doc["k"],
            "content_type": doc["ct"], "version_ms": doc["v"], "size": doc["s"],
            "segment_id": doc.get("seg", 0), "offset": doc.get("off", 0),
            "origin": doc.get("o", ""), "headers": tuple(headers.items()) if headers else ()})
        if len(_decoded) >= DECODED_KEPT:
            _decoded.clear()
        _decoded[raw] = manifest
        return manifest

    def relocated(self, segment_id: int, offset: int) -> "Manifest":
        return _built(type(self), {**self.__dict__, "segment_id": segment_id, "offset": offset})

    def versioned(self, version_ms: int, origin: str) -> "Manifest":
        return _built(type(self), {**self.__dict__, "version_ms": version_ms, "origin": origin})


def _built(cls: type[Manifest], fields: dict[str, Any]) -> Manifest:
    """A Manifest with every one of its ``fields`` given, made without ``__init__``: a frozen
    dataclass sets each field through ``object.__setattr__``, which made building one cost
    more than decoding its JSON (batch reads decode a manifest per blob)."""
    manifest = object.__new__(cls)
    manifest.__dict__.update(fields)
    return manifest


def version_order(version_ms: int, origin: str) -> tuple[int, str]:
    """The total order of last-writer-wins, the same on every node and in bootstrap.

    ``version_ms`` (the origin's wall clock) decides; two writes of one key made on two
    nodes in the same millisecond are ordered by their origin node URL, so every node
    keeps the same one. One node never makes two versions of a key with the same
    ``version_ms`` (a local write takes ``stored + 1`` at least), so the pair is unique.
    """
    return (version_ms, origin)


def stored_headers(headers: Any) -> tuple[tuple[str, str], ...]:
    """``headers`` (a mapping from a client or a peer) as ``Manifest.headers``, or
    ``BadRequest``: a few lower-case names, printable ASCII values of bounded length."""
    if not isinstance(headers, dict) or len(headers) > MAX_STORED_HEADERS:
        raise BadRequest(f"Invalid headers: expected an object of at most {MAX_STORED_HEADERS} entries")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise BadRequest(f"Invalid header name {str(name)[:40]!r}")
        if (not isinstance(value, str) or len(value) > MAX_STORED_HEADER_VALUE
                or not _HEADER_VALUE.fullmatch(value)):
            raise BadRequest(f"Invalid {name}: expected printable ASCII, at most "
                             f"{MAX_STORED_HEADER_VALUE} characters")
    return tuple(sorted(headers.items()))
