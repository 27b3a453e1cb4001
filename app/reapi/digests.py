"""Parsing and validation of REAPI digests, instance names and ByteStream resource names.

Everything a client names is checked here before it reaches storage; a bad
value raises ``BadRequest`` (→ INVALID_ARGUMENT).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from app.errors import BadRequest
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.storage.keys import EMPTY_SHA256, parse_decimal, validate_component

DEFAULT_NAMESPACE = "default"
MAX_INT64 = 2**63 - 1  # Digest.size_bytes is an int64
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_UUID_LIKE = re.compile(r"^[0-9A-Za-z_.\-]{1,128}$")
# Path segments REAPI reserves: an instance name never contains them, so they anchor the parse.
_RESERVED_SEGMENTS = frozenset(
    ("blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"))


class BlobDigest(NamedTuple):
    """A validated SHA256 digest: lower-case hex hash and a non-negative size. A named
    tuple: FindMissingBlobs builds and hashes thousands per call."""

    hash: str
    size: int

    @property
    def is_empty(self) -> bool:
        return self.size == 0 and self.hash == EMPTY_SHA256

    @property
    def cas_key(self) -> str:
        return f"blob/{self.hash}/{self.size}"

    @property
    def ac_key(self) -> str:
        return f"action_cache/{self.hash}/{self.size}"

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size)

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


EMPTY_DIGEST = BlobDigest(EMPTY_SHA256, 0)


def parse_digest(digest: re_pb2.Digest | None, what: str = "digest") -> BlobDigest:
    """Validate a ``Digest`` message (SHA256 only)."""
    if digest is None:
        raise BadRequest(f"Missing {what}")
    return digest_from_parts(digest.hash, digest.size_bytes, what)


def digest_from_parts(hash_hex: str, size: int | str, what: str = "digest") -> BlobDigest:
    if not _HEX64.match(hash_hex or ""):
        raise BadRequest(f"Invalid {what}: hash must be 64 hex characters (SHA256)")
    if isinstance(size, str):  # from a resource name: canonical decimal, no leading zeros
        not_decimal = f"Invalid {what}: size must be a decimal integer"
        if len(size) > 1 and size[0] == "0":
            raise BadRequest(not_decimal)
        size_int = parse_decimal(size, what, maximum=MAX_INT64, message=not_decimal)
    elif size < 0:
        raise BadRequest(f"Invalid {what}: size must not be negative")
    else:
        size_int = size
    hash_hex = hash_hex.lower()
    if size_int == 0 and hash_hex != EMPTY_SHA256:
        raise BadRequest(f"Invalid {what}: size 0 with a hash that is not the empty blob's")
    return BlobDigest(hash_hex, size_int)


def parse_digests(digests: Iterable[re_pb2.Digest], what: str = "digest") -> list[BlobDigest]:
    return [parse_digest(d, what) for d in digests]


def namespace_for(instance_name: str) -> str:
    """SPEC §2: the REAPI namespace is the instance name; empty means ``default``."""
    validate_component(instance_name, "instance_name", allow_slash=True, allow_empty=True)
    if instance_name.startswith("/") or instance_name.endswith("/") or "//" in instance_name:
        raise BadRequest("Invalid instance_name: empty path segment")
    if _RESERVED_SEGMENTS.intersection(instance_name.split("/")):
        raise BadRequest("Invalid instance_name: contains a reserved path segment")
    return instance_name or DEFAULT_NAMESPACE


def parse_action(instance_name: str, action_digest: re_pb2.Digest) -> tuple[str, BlobDigest]:
    """The namespace and action digest an ActionCache request names."""
    return namespace_for(instance_name), parse_digest(action_digest, "action_digest")


@dataclass(frozen=True)
class ReadResource:
    namespace: str
    digest: BlobDigest


@dataclass(frozen=True)
class WriteResource:
    namespace: str
    upload_id: str
    digest: BlobDigest


def _split_at(parts: list[str], anchor: str) -> tuple[str, list[str]]:
    """Split ``a/b/<anchor>/rest`` into instance ``a/b`` and ``[anchor, rest...]``."""
    try:
        index = parts.index(anchor)
    except ValueError:
        raise BadRequest(f"Invalid resource name: expected a '{anchor}/' segment") from None
    return "/".join(parts[:index]), parts[index:]


def _blob_tail(tail: list[str], resource: str) -> tuple[BlobDigest, list[str]]:
    """Parse ``blobs/{hash}/{size}`` or ``compressed-blobs/identity/{hash}/{size}``."""
    if tail and tail[0] == "blobs" and len(tail) >= 3:
        return digest_from_parts(tail[1], tail[2], "resource digest"), tail[3:]
    if tail and tail[0] == "compressed-blobs" and len(tail) >= 4:
        if tail[1] != "identity":
            raise BadRequest(f"Unsupported compressor {tail[1]!r} in resource name")
        return digest_from_parts(tail[2], tail[3], "resource digest"), tail[4:]
    raise BadRequest(f"Invalid resource name {resource[:200]!r}")


def parse_read_resource(resource: str) -> ReadResource:
    """``[{instance}/]blobs/{hash}/{size}`` (also ``compressed-blobs/identity/...``)."""
    parts = _checked_parts(resource)
    anchor = "compressed-blobs" if "compressed-blobs" in parts and "blobs" not in parts else "blobs"
    instance, tail = _split_at(parts, anchor)
    digest, rest = _blob_tail(tail, resource)
    if rest:
        raise BadRequest(f"Invalid resource name {resource[:200]!r}: trailing segments")
    return ReadResource(namespace_for(instance), digest)


def parse_write_resource(resource: str) -> WriteResource:
    """``[{instance}/]uploads/{uuid}/blobs/{hash}/{size}[/{optional metadata}...]``."""
    parts = _checked_parts(resource)
    instance, tail = _split_at(parts, "uploads")
    if len(tail) < 2 or not _UUID_LIKE.match(tail[1]):
        raise BadRequest(f"Invalid resource name {resource[:200]!r}: expected uploads/{{uuid}}/")
    digest, _metadata = _blob_tail(tail[2:], resource)
    return WriteResource(namespace_for(instance), tail[1], digest)


def _checked_parts(resource: str) -> list[str]:
    if not resource:
        raise BadRequest("Missing resource_name")
    validate_component(resource, "resource_name", allow_slash=True)
    return resource.split("/")
