"""The data the transports hand to the hooks, and the principal they get back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# ``ctx.operation`` values (Kura's names).
READ = "artifact.read"
WRITE = "artifact.write"
INSPECT = "artifact.inspect"
NAMESPACE_DELETE = "namespace.delete"
CAPABILITIES_READ = "capabilities.read"
REQUEST = "request"  # a call that reads or writes no artifact (Turborepo's usage events)


@dataclass
class HookContext:
    """One request as the Lua hooks see it (``ctx``).

    ``headers`` keys must be lower-case; for gRPC they are the call metadata.
    Empty optional fields reach Lua as ``nil`` (a tenant-wide request has no
    ``namespace_id``), as in Kura.
    """

    transport: str  # "http" or "grpc"
    route: str  # route template ("/api/cache/cas/{id}") or "reapi.bytestream.write"
    method: str  # HTTP method; "RPC" for gRPC (as Kura)
    operation: str  # artifact.read | artifact.write | artifact.inspect | namespace.delete | capabilities.read | request
    server_tenant_id: str
    tenant_id: str | None = None
    namespace_id: str | None = None
    producer: str | None = None
    artifact_key: str | None = None
    artifact_hash: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)

    def to_lua_data(self, status_code: int | None = None) -> dict[str, Any]:
        """Plain data for the Lua ``ctx`` table (no Python objects cross into Lua)."""
        data: dict[str, Any] = {
            "transport": self.transport,
            "route": self.route,
            "method": self.method,
            "operation": self.operation,
            "server_tenant_id": self.server_tenant_id,
            "headers": {str(k).lower(): str(v) for k, v in self.headers.items()},
            "query": {str(k): str(v) for k, v in self.query.items()},
        }
        for name in ("tenant_id", "namespace_id", "producer", "artifact_key", "artifact_hash"):
            value = getattr(self, name)
            if value:
                data[name] = value
        if status_code is not None:
            data["status_code"] = int(status_code)
        return data


@dataclass(frozen=True)
class Principal:
    """Who the ``authenticate`` hook said the caller is. Shared via the caches: do not mutate."""

    id: str
    kind: str
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def to_lua_data(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "attributes": dict(self.attributes)}
