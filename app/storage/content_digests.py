"""The content digest functions blobs are verified with: SHA256 (the default) and BLAKE3.

One name per function (REAPI's lower-case ``DigestFunction`` spelling, as in resource
names) and one way to hash with it; the REAPI parsers and the staging area both use
these, so a blob is always verified with the function its digest names.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Protocol

import blake3

SHA256 = "sha256"
BLAKE3 = "blake3"


class Hasher(Protocol):
    def update(self, data: bytes, /) -> object: ...

    def hexdigest(self) -> str: ...


_HASHERS: dict[str, Callable[[], Hasher]] = {
    SHA256: hashlib.sha256,
    BLAKE3: blake3.blake3,
}
DIGEST_FUNCTIONS = tuple(_HASHERS)
# The hash of zero bytes under each function: the empty blob is always present.
EMPTY_HASHES = {name: new().hexdigest() for name, new in _HASHERS.items()}


def new_hasher(function: str) -> Hasher:
    """A fresh hasher for ``function`` (one of ``DIGEST_FUNCTIONS``)."""
    return _HASHERS[function]()


def hexdigest(function: str, data: bytes) -> str:
    """The hex digest of ``data`` under ``function``."""
    hasher = new_hasher(function)
    hasher.update(data)
    return hasher.hexdigest()
