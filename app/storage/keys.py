"""Artifact identity (SPEC section 2) and validation of client-supplied ids and keys."""
from __future__ import annotations

import hashlib
import re

from app.errors import BadRequest

PRODUCERS = ("xcode", "gradle", "module", "reapi", "nx", "metro")
MAX_KEY_BYTES = 1024
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def artifact_id(producer: str, tenant_id: str, namespace_id: str, key: str) -> bytes:
    """Raw 32-byte sha256 of ``producer \\0 tenant \\0 namespace \\0 key``."""
    material = b"\0".join(
        (producer.encode(), tenant_id.encode(), namespace_id.encode(), key.encode()))
    return hashlib.sha256(material).digest()


def validate_component(value: str, what: str, *, allow_slash: bool = False,
                       allow_empty: bool = False) -> str:
    """Reject ids that could escape a path, hide control bytes or exceed the key limit."""
    if not value:
        if allow_empty:
            return value
        raise BadRequest(f"Missing {what}")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(f"Invalid {what}: longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise BadRequest(f"Invalid {what}: control characters are not allowed")
    if not allow_slash and ("/" in value or "\\" in value):
        raise BadRequest(f"Invalid {what}: slashes are not allowed")
    parts = value.replace("\\", "/").split("/")
    if any(p in (".", "..") for p in parts):
        raise BadRequest(f"Invalid {what}: path traversal is not allowed")
    return value


def validate_sha256_hex(value: str, what: str = "digest") -> str:
    value = value.lower()
    if not _HEX64.match(value):
        raise BadRequest(f"Invalid {what}: expected 64 hex characters")
    return value
