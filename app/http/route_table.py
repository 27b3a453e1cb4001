"""What each public endpoint is, in Kura's terms: its route template (metrics labels and
the hooks' ``ctx.route``), the operation it performs and the producer it touches."""
from __future__ import annotations

import re
from dataclasses import dataclass

READ = "artifact.read"
WRITE = "artifact.write"
INSPECT = "artifact.inspect"


@dataclass(frozen=True)
class RouteInfo:
    template: str
    operation: str
    producer: str | None = None
    default_namespace: str = ""


ROUTES: dict[str, RouteInfo] = {
    "xcode_cas.upload": RouteInfo("/api/cache/cas/{id}", WRITE, "xcode"),
    "xcode_cas.download": RouteInfo("/api/cache/cas/{id}", READ, "xcode"),
    "keyvalue.put_entry": RouteInfo("/api/cache/keyvalue", WRITE, "xcode"),
    "keyvalue.get_entry": RouteInfo("/api/cache/keyvalue/{cas_id}", READ, "xcode"),
    "module_cache.start": RouteInfo("/api/cache/module/start", WRITE, "module"),
    "module_cache.part": RouteInfo("/api/cache/module/part", WRITE, "module"),
    "module_cache.complete": RouteInfo("/api/cache/module/complete", WRITE, "module"),
    "module_cache.download": RouteInfo("/api/cache/module/{id}", READ, "module"),
    "gradle.put": RouteInfo("/api/cache/gradle/{cache_key}", WRITE, "gradle"),
    "gradle.get": RouteInfo("/api/cache/gradle/{cache_key}", READ, "gradle"),
    "gradle.put_by_path": RouteInfo("/gradle/{tenant_id}/{namespace_id}/{cache_key}", WRITE, "gradle"),
    "gradle.get_by_path": RouteInfo("/gradle/{tenant_id}/{namespace_id}/{cache_key}", READ, "gradle"),
    "nx.put": RouteInfo("/v1/cache/{hash}", WRITE, "nx", "nx"),
    "nx.get": RouteInfo("/v1/cache/{hash}", READ, "nx", "nx"),
    "nx.put_in_namespace": RouteInfo("/nx/{namespace_id}/v1/cache/{hash}", WRITE, "nx"),
    "nx.get_in_namespace": RouteInfo("/nx/{namespace_id}/v1/cache/{hash}", READ, "nx"),
    "metro.put": RouteInfo("/api/metro/cache/{cache_key}", WRITE, "metro", "metro"),
    "metro.get": RouteInfo("/api/metro/cache/{cache_key}", READ, "metro", "metro"),
    "namespaces.clean": RouteInfo("/api/cache/clean", "namespace.delete"),
}

_PLACEHOLDER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def template_for(endpoint: str | None, rule: str | None) -> str:
    """Kura-style template for an endpoint; other rules get ``{name}`` placeholders."""
    info = ROUTES.get(endpoint or "")
    if info is not None:
        return info.template
    if rule is None:
        return "unmatched"
    return _PLACEHOLDER.sub(r"{\1}", rule)
