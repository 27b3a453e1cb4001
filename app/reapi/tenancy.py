"""How a gRPC call's metadata is read: its headers and the tenant it names (SPEC §4).

A node serves exactly one tenant, so artifact ids always use ``KURA_TENANT_ID``
(as the HTTP routes do with their ``tenant_id`` query); the tenant a call names
in ``x-kura-tenant-id`` or ``x-tuist-account-handle`` is validated like any
other id and handed to the extension hooks as ``ctx.tenant_id``.

Repeated keys. gRPC metadata may carry a key several times. In this process
the FIRST value of a key is the one that counts, everywhere (Kura's tenant
lookup, tonic's ``MetadataMap::get``, takes the first value too):

- ``call_headers`` keeps the first value of each key (``ctx.headers``);
- ``requested_tenant`` takes, in the order ``x-kura-tenant-id``,
  ``x-tuist-account-handle``, the first header whose first value is not blank.

So ``x-kura-tenant-id: acme`` followed by ``x-kura-tenant-id: globex`` names
``acme``, and so does ``x-tuist-account-handle: globex`` plus
``x-kura-tenant-id: acme`` in any order. The observer (which validates the
tenant of every call) and the hook context both read it through
``requested_tenant``, so they can never disagree.
"""
from __future__ import annotations

from typing import Iterable

from app.storage.keys import validate_component

TENANT_HEADERS = ("x-kura-tenant-id", "x-tuist-account-handle")

Metadata = Iterable[tuple[str, "str | bytes"]]


def call_headers(metadata: Metadata | None) -> dict[str, str]:
    """The call's metadata as lower-case headers: first value of each key; ``-bin`` keys skipped."""
    headers: dict[str, str] = {}
    for key, value in metadata or ():
        key = key.lower()
        if key.endswith("-bin") or key in headers:
            continue
        headers[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return headers


def requested_tenant(metadata: Metadata | None) -> str | None:
    """The tenant a call names in its metadata, if any (BadRequest when malformed)."""
    headers = call_headers(metadata)
    for header in TENANT_HEADERS:
        value = headers.get(header, "").strip()
        if value:
            return validate_component(value, "tenant_id")
    return None
