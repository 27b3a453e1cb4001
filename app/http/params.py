"""Query and path parameters shared by the protocol blueprints (SPEC section 2)."""
from __future__ import annotations

from flask import request

from app.errors import BadRequest
from app.storage.keys import validate_component

TENANT_WIDE = "_"  # path segment meaning the tenant-wide namespace "" (stock Gradle URLs)


def query(name: str, *aliases: str) -> str | None:
    for key in (name, *aliases):
        value = request.args.get(key)
        if value is not None:
            return value
    return None


def tenant_id(required: bool = True) -> str:
    value = query("tenant_id", "account_handle")
    if not value:
        if required:
            raise BadRequest("Missing tenant_id")
        return ""
    return validate_component(value, "tenant_id")


def namespace_id(default: str = "") -> str:
    value = query("namespace_id", "project_handle")
    if not value:
        return default
    return validate_component(value, "namespace_id")


def path_namespace(value: str) -> str:
    """A namespace given as a path segment; ``_`` is the tenant-wide namespace."""
    if value == TENANT_WIDE:
        return ""
    return validate_component(value, "namespace_id")


def required_query(name: str, what: str | None = None) -> str:
    value = request.args.get(name)
    if not value:
        raise BadRequest(f"Missing {what or name}")
    return value
