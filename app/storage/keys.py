"""Artifact identity (SPEC section 2) and validation of client-supplied ids, keys and numbers."""
from __future__ import annotations

import hashlib
import re
from typing import Iterable

from app.errors import BadRequest

PRODUCERS = ("xcode", "gradle", "module", "reapi", "nx", "metro", "turbo", "bazel")
MAX_KEY_BYTES = 1024

# ASCII digits only: str.isdigit() also accepts "²" or "٣", which int() then refuses or reads.
_DECIMAL = re.compile(r"[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def artifact_id(producer: str, tenant_id: str, namespace_id: str, key: str) -> bytes:
    """Raw 32-byte sha256 of ``producer \\0 tenant \\0 namespace \\0 key``."""
    return artifact_ids(producer, tenant_id, namespace_id, (key,))[0]


def artifact_ids(producer: str, tenant_id: str, namespace_id: str,
                 keys: Iterable[str]) -> list[bytes]:
    """:func:`artifact_id` of each key of one namespace (the common prefix encoded once)."""
    prefix = b"\0".join((producer.encode(), tenant_id.encode(), namespace_id.encode(), b""))
    sha256 = hashlib.sha256
    return [sha256(prefix + key.encode()).digest() for key in keys]


def validate_component(value: str, what: str, *, allow_slash: bool = False,
                       allow_empty: bool = False) -> str:
    """Reject ids that could escape a path, hide control bytes or exceed the key limit."""
    if not value:
        if allow_empty:
            return value
        raise BadRequest(f"Missing {what}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): not text at all
        raise BadRequest(f"Invalid {what}: not valid UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise BadRequest(f"Invalid {what}: longer than {MAX_KEY_BYTES} bytes")
    if _CONTROL.search(value):
        raise BadRequest(f"Invalid {what}: control characters are not allowed")
    if not allow_slash and ("/" in value or "\\" in value):
        raise BadRequest(f"Invalid {what}: slashes are not allowed")
    parts = value.replace("\\", "/").split("/")
    if any(p in (".", "..") for p in parts):
        raise BadRequest(f"Invalid {what}: path traversal is not allowed")
    return value


def is_hex64(text: str) -> bool:
    """64 hex digits (either case) and nothing else. Faster than a regex, and unlike
    ``^...$`` it does not let a trailing newline through; 64 characters decode to 32
    bytes only if none of them is the whitespace ``fromhex`` skips."""
    if len(text) != 64:
        return False
    try:
        return len(bytes.fromhex(text)) == 32
    except ValueError:
        return False


def validate_sha256_hex(value: str, what: str = "digest") -> str:
    value = value.lower()
    if not is_hex64(value):
        raise BadRequest(f"Invalid {what}: expected 64 hex characters")
    return value


def decimal_value(text: str, maximum: int) -> int | None:
    """``text`` as a number if it is ASCII decimal digits only and at most ``maximum``, else
    None. The length is checked before converting: no client string reaches ``int()`` long."""
    if len(text) > len(str(maximum)) or not _DECIMAL.fullmatch(text):
        return None
    value = int(text)
    return value if value <= maximum else None


def parse_decimal(text: str, what: str, *, maximum: int, minimum: int = 0,
                  message: str | None = None) -> int:
    """A client-supplied decimal number in ``[minimum, maximum]``; ``BadRequest`` otherwise
    (``message``, default ``Invalid {what}``)."""
    value = decimal_value(text, maximum)
    if value is None or value < minimum:
        raise BadRequest(message or f"Invalid {what}")
    return value
