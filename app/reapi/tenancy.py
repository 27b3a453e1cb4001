"""Which tenant a gRPC call names (SPEC §4: metadata ``x-kura-tenant-id`` or ``x-tuist-account-handle``).

A node serves exactly one tenant, so artifact ids always use ``KURA_TENANT_ID``
(as the HTTP routes do with their ``tenant_id`` query); the requested tenant is
validated like any other id and kept for the extension hooks' ``ctx.tenant_id``.
"""
from __future__ import annotations

from typing import Iterable

from app.storage.keys import validate_component

TENANT_HEADERS = ("x-kura-tenant-id", "x-tuist-account-handle")


def requested_tenant(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The tenant a call names in its metadata, if any (BadRequest when malformed)."""
    values = {key.lower(): value for key, value in (metadata or ())}
    for header in TENANT_HEADERS:
        value = values.get(header)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value:
            return validate_component(value.strip(), "tenant_id")
    return None
