"""Parsing and validation of REAPI digests, instance names and ByteStream resource names.

Everything a client names is checked here before it reaches storage; a bad
value raises ``BadRequest`` (→ INVALID_ARGUMENT).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from app.errors import BadRequest
from app.reapi.compression import IDENTITY, compressor_from_name
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.storage.content_digests import BLAKE3, EMPTY_HASHES, SHA256
from app.storage.keys import is_hex64, parse_decimal, validate_component

DEFAULT_NAMESPACE = "default"
MAX_INT64 = 2**63 - 1  # Digest.size_bytes is an int64
_UUID_LIKE = re.compile(r"[0-9A-Za-z_.\-]{1,128}")
# Path segments REAPI reserves: an instance name never contains them, so they anchor the parse.
_RESERVED_SEGMENTS = frozenset(
    ("blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"))
# The digest functions served, by DigestFunction value. UNKNOWN (a request that does not
# say) is SHA256: REAPI lets the server infer it from the hash length, and the only other
# function served, BLAKE3, must always be named.
_FUNCTIONS = {
    re_pb2.DigestFunction.UNKNOWN: SHA256,
    re_pb2.DigestFunction.SHA256: SHA256,
    re_pb2.DigestFunction.BLAKE3: BLAKE3,
}
# Advertised in CacheCapabilities.digest_functions.
DIGEST_FUNCTIONS = [re_pb2.DigestFunction.SHA256, re_pb2.DigestFunction.BLAKE3]
# Lower-case DigestFunction names: the optional `{digest_function}/` segment of a resource name.
_FUNCTION_SEGMENTS = {name.lower() for name in re_pb2.DigestFunction.Value.keys()} - {"unknown"}


def digest_function_for(value: int) -> str:
    """The digest function a request names (``digest_function`` field); INVALID_ARGUMENT for
    one this cache does not serve."""
    function = _FUNCTIONS.get(value)
    if function is None:
        raise BadRequest(f"Unsupported digest_function {value}: this cache serves SHA256 and BLAKE3")
    return function


class BlobDigest(NamedTuple):
    """A validated digest: its function, lower-case hex hash and a non-negative size. A named
    tuple: FindMissingBlobs builds and hashes thousands per call."""

    hash: str
    size: int
    function: str = SHA256

    @property
    def is_empty(self) -> bool:
        return self.size == 0 and self.hash == EMPTY_HASHES[self.function]

    @property
    def _path(self) -> str:
        # SHA256 keys keep their original form (SPEC §2); another function is a segment of
        # the key, so the same bytes under two functions are two artifacts.
        if self.function == SHA256:
            return f"{self.hash}/{self.size}"
        return f"{self.function}/{self.hash}/{self.size}"

    @property
    def cas_key(self) -> str:
        return f"blob/{self._path}"

    @property
    def ac_key(self) -> str:
        return f"action_cache/{self._path}"

    def to_proto(self) -> re_pb2.Digest:
        return re_pb2.Digest(hash=self.hash, size_bytes=self.size)

    def __str__(self) -> str:
        return self._path


EMPTY_DIGEST = BlobDigest(EMPTY_HASHES[SHA256], 0)


def parse_digest(digest: re_pb2.Digest | None, what: str = "digest",
                 function: str = SHA256) -> BlobDigest:
    """Validate a ``Digest`` message computed with ``function``."""
    if digest is None:
        raise BadRequest(f"Missing {what}")
    return digest_from_parts(digest.hash, digest.size_bytes, what, function)


def digest_from_parts(hash_hex: str, size: int | str, what: str = "digest",
                      function: str = SHA256) -> BlobDigest:
    if not is_hex64(hash_hex or ""):
        raise BadRequest(f"Invalid {what}: hash must be 64 hex characters ({function.upper()})")
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
    if size_int == 0 and hash_hex != EMPTY_HASHES[function]:
        raise BadRequest(f"Invalid {what}: size 0 with a hash that is not the empty blob's")
    return BlobDigest(hash_hex, size_int, function)


def parse_digests(digests: Iterable[re_pb2.Digest], what: str = "digest",
                  function: str = SHA256) -> list[BlobDigest]:
    """:func:`parse_digest` of each (FindMissingBlobs sends thousands): a non-empty digest
    with a well-formed hash is accepted here at once, anything else goes through
    :func:`digest_from_parts`, which rejects or accepts it."""
    parsed = []
    append = parsed.append
    for digest in digests:
        hash_hex, size = digest.hash, digest.size_bytes
        if size > 0 and is_hex64(hash_hex):
            append(BlobDigest(hash_hex.lower(), size, function))
        else:
            append(digest_from_parts(hash_hex, size, what, function))
    return parsed


def namespace_for(instance_name: str) -> str:
    """SPEC §2: the REAPI namespace is the instance name; empty means ``default``."""
    validate_component(instance_name, "instance_name", allow_slash=True, allow_empty=True)
    if instance_name.startswith("/") or instance_name.endswith("/") or "//" in instance_name:
        raise BadRequest("Invalid instance_name: empty path segment")
    if _RESERVED_SEGMENTS.intersection(instance_name.split("/")):
        raise BadRequest("Invalid instance_name: contains a reserved path segment")
    return instance_name or DEFAULT_NAMESPACE


def parse_action(instance_name: str, action_digest: re_pb2.Digest,
                 digest_function: int = re_pb2.DigestFunction.UNKNOWN) -> tuple[str, BlobDigest]:
    """The namespace and action digest an ActionCache request names."""
    return (namespace_for(instance_name),
            parse_digest(action_digest, "action_digest", digest_function_for(digest_function)))


@dataclass(frozen=True)
class ReadResource:
    namespace: str
    digest: BlobDigest
    compressor: str = IDENTITY


@dataclass(frozen=True)
class WriteResource:
    namespace: str
    upload_id: str
    digest: BlobDigest
    compressor: str = IDENTITY

    @property
    def upload_name(self) -> str:
        """What identifies this upload's kept bytes: the same for every compressor (they
        are kept uncompressed), distinct per namespace, upload id and digest."""
        return f"{self.namespace}\0{self.upload_id}\0{self.digest.cas_key}"


def _split_at(parts: list[str], anchor: str) -> tuple[str, list[str]]:
    """Split ``a/b/<anchor>/rest`` into instance ``a/b`` and ``[anchor, rest...]``."""
    try:
        index = parts.index(anchor)
    except ValueError:
        raise BadRequest(f"Invalid resource name: expected a '{anchor}/' segment") from None
    return "/".join(parts[:index]), parts[index:]


def _blob_tail(tail: list[str], resource: str) -> tuple[BlobDigest, str, list[str]]:
    """Parse ``blobs/[{digest_function}/]{hash}/{size}`` or
    ``compressed-blobs/{compressor}/[{digest_function}/]{hash}/{size}``: the digest, the
    compressor and what follows."""
    if tail and tail[0] == "blobs":
        compressor, rest = IDENTITY, tail[1:]
    elif tail and tail[0] == "compressed-blobs" and len(tail) >= 2:
        compressor, rest = compressor_from_name(tail[1]), tail[2:]
    else:
        raise BadRequest(f"Invalid resource name {resource[:200]!r}")
    function = SHA256
    if rest and rest[0] in _FUNCTION_SEGMENTS:
        # REAPI: the segment names a function whose hash length is ambiguous (BLAKE3);
        # the others are inferred from the hash and named here only by mistake.
        function = digest_function_for(re_pb2.DigestFunction.Value.Value(rest[0].upper()))
        rest = rest[1:]
    if len(rest) < 2:
        raise BadRequest(f"Invalid resource name {resource[:200]!r}")
    return digest_from_parts(rest[0], rest[1], "resource digest", function), compressor, rest[2:]


def parse_read_resource(resource: str) -> ReadResource:
    """``[{instance}/]blobs/[{digest_function}/]{hash}/{size}`` or
    ``[{instance}/]compressed-blobs/{compressor}/[{digest_function}/]{hash}/{size}``."""
    parts = _checked_parts(resource)
    anchor = "compressed-blobs" if "compressed-blobs" in parts and "blobs" not in parts else "blobs"
    instance, tail = _split_at(parts, anchor)
    digest, compressor, rest = _blob_tail(tail, resource)
    if rest:
        raise BadRequest(f"Invalid resource name {resource[:200]!r}: trailing segments")
    return ReadResource(namespace_for(instance), digest, compressor)


def parse_write_resource(resource: str) -> WriteResource:
    """``[{instance}/]uploads/{uuid}/blobs/[{digest_function}/]{hash}/{size}[/{metadata}...]``
    or the same with ``compressed-blobs/{compressor}/`` in place of ``blobs/``."""
    parts = _checked_parts(resource)
    instance, tail = _split_at(parts, "uploads")
    if len(tail) < 2 or not _UUID_LIKE.fullmatch(tail[1]):
        raise BadRequest(f"Invalid resource name {resource[:200]!r}: expected uploads/{{uuid}}/")
    digest, compressor, _metadata = _blob_tail(tail[2:], resource)
    return WriteResource(namespace_for(instance), tail[1], digest, compressor)


def _checked_parts(resource: str) -> list[str]:
    if not resource:
        raise BadRequest("Missing resource_name")
    validate_component(resource, "resource_name", allow_slash=True)
    return resource.split("/")
