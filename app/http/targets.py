"""What a request addresses (its ``Target``) and the small declarative parsers that read it.

A route declares its target parser (``app.http.routes``); the parser works on the raw
request target — the path's segments exactly as sent, still percent-encoded, and the
query string — never on Flask's request, so the blueprint and the HTTP worker's download
fast path (``app.http.fast_reads``) read the same tenant, namespace and key.

Query parameters follow Kura: a repeated name keeps its last value; ``tenant_id`` and
``namespace_id`` fall back to their aliases ``account_handle`` / ``project_handle`` only
when absent, so ``?tenant_id=&account_handle=a`` is a missing tenant. Path segments and
the query parameters a route reads must be valid UTF-8 once percent-decoded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol
from urllib.parse import parse_qsl, unquote_to_bytes

from app.errors import BadRequest
from app.storage.keys import validate_component

if TYPE_CHECKING:
    from app.storage.multipart import MultipartUploads, Upload

TENANT_WIDE = "_"  # path segment meaning the tenant-wide namespace "" (stock Gradle URLs)
ALIASES = {"tenant_id": ("account_handle",), "namespace_id": ("project_handle",)}


def decode(raw: str, what: str) -> str:
    """Percent-decode one path segment; it must be UTF-8."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"Invalid {what}: not valid UTF-8") from None


class Query:
    """A query string parsed once, the way Kura reads it (see the module docstring)."""

    def __init__(self, query_string: str) -> None:
        self._values: dict[str, str] = {}
        # surrogateescape keeps undecodable bytes so that reading them can refuse them.
        for name, value in parse_qsl(query_string, keep_blank_values=True, errors="surrogateescape"):
            self._values[name] = value

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of ``name``, else of its first alias present; empty counts as absent."""
        for key in (name, *ALIASES.get(name, ())):
            if key in self._values:
                return _strict(self._values[key], name) or default
        return default

    def required(self, name: str) -> str:
        value = self.get(name)
        if not value:
            raise BadRequest(f"Missing {name}")
        return value

    def to_dict(self) -> dict[str, str]:
        """Every parameter, for the hooks' ``ctx.query`` (undecodable bytes replaced)."""
        return {_lossy(name): _lossy(value) for name, value in self._values.items()}


def _strict(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"Invalid {what}: not valid UTF-8") from None
    return value


def _lossy(value: str) -> str:
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class Sources:
    """What a target parser may read. ``path_args`` are the raw (still encoded) segments."""

    path_args: Mapping[str, str]
    query: Query
    node_tenant: str
    read_body: "Callable[[int, str], bytes] | None" = None  # (limit, too-large message)
    max_document_bytes: int = 0
    uploads: "MultipartUploads | None" = None


@dataclass(frozen=True)
class Target:
    """What a request addresses: the view stores or serves exactly this, and the hooks'
    ``ctx`` carries exactly this (``key`` is ``ctx.artifact_key``)."""

    tenant_id: str
    namespace_id: str
    key: str | None
    artifact_hash: str | None
    query: Query
    document: bytes | None = None  # keyvalue PUT: the document as stored
    upload: "Upload | None" = None  # module part/complete: the upload, None when unknown


@dataclass(frozen=True)
class KeyRead:
    key: str | None
    artifact_hash: str | None = None
    document: bytes | None = None


class TargetParser(Protocol):
    def parse(self, sources: Sources) -> Target: ...


# --- small declarative sources ------------------------------------------------------


class QueryTenant:
    """``tenant_id`` (alias ``account_handle``) from the query; required."""

    def read(self, s: Sources) -> str:
        value = s.query.get("tenant_id")
        if not value:
            raise BadRequest("Missing tenant_id")
        return validate_component(value, "tenant_id")


@dataclass(frozen=True)
class PathTenant:
    var: str = "tenant_id"

    def read(self, s: Sources) -> str:
        return validate_component(decode(s.path_args[self.var], "tenant_id"), "tenant_id")


class NodeTenant:
    """Routes that carry no tenant (Nx, Metro) are the node's own tenant, as in Kura."""

    def read(self, s: Sources) -> str:
        return s.node_tenant


@dataclass(frozen=True)
class QueryNamespace:
    """``namespace_id`` (alias ``project_handle``); absent or empty is ``default``."""

    default: str = ""

    def read(self, s: Sources) -> str:
        value = s.query.get("namespace_id")
        if not value:
            return self.default
        return validate_component(value, "namespace_id")


@dataclass(frozen=True)
class PathNamespace:
    """A namespace path segment; ``_`` is the tenant-wide namespace."""

    var: str = "namespace_id"

    def read(self, s: Sources) -> str:
        value = decode(s.path_args[self.var], "namespace_id")
        if value == TENANT_WIDE:
            return ""
        return validate_component(value, "namespace_id")


@dataclass(frozen=True)
class PathKey:
    """The key is ``prefix`` + one path segment; ``hashed``: the segment is also the hash."""

    var: str
    what: str
    prefix: str = ""
    hashed: bool = True

    def read(self, s: Sources) -> KeyRead:
        value = validate_component(decode(s.path_args[self.var], self.what), self.what)
        return KeyRead(self.prefix + value, value if self.hashed else None)


class NoKey:
    def read(self, s: Sources) -> KeyRead:
        return KeyRead(None)


class _Reads(Protocol):
    def read(self, s: Sources) -> Any: ...


@dataclass(frozen=True)
class Targets:
    """The common shape: a tenant source, a namespace source and a key source."""

    tenant: _Reads
    namespace: _Reads
    key: _Reads = field(default_factory=NoKey)

    def parse(self, s: Sources) -> Target:
        tenant = self.tenant.read(s)
        namespace = self.namespace.read(s)
        key = self.key.read(s)
        return Target(tenant, namespace, key.key, key.artifact_hash, s.query, document=key.document)


QUERY_TENANT = QueryTenant()
NODE_TENANT = NodeTenant()
QUERY_NAMESPACE = QueryNamespace()
