"""gRPC server interceptor that runs the hooks for every REAPI call (REAPI process only).

This is the only module of ``app.extensions`` that imports ``grpc``; the HTTP
workers must never import it.

``HandlerCallDetails`` carries the method and metadata but not the request, and
the REAPI namespace lives in the request (``instance_name``, or the ByteStream
``resource_name``). So the interceptor wraps the method handler: for a unary
request it reads the request it is handed, for a client stream (ByteStream
Write) it peeks the first message and puts it back in front of the stream.
That gives per-namespace read/write grants without servicer code. Calls are
checked once, before the servicer runs; per-digest decisions inside batch
calls are not made (the hooks see ``artifact_key`` only for ByteStream).

Health checks and reflection are not hooked.

Denials: by default the ``KuraError`` from ``Extensions.check`` is raised so an
outer interceptor (``app.reapi.observer.RpcObserver``, listed before this one)
maps it with ``app.reapi.errors.status_for`` and counts it. With
``abort_on_deny=True`` the interceptor aborts itself using ``grpc_status_for``.
The principal of the current call is available to servicers as
``current_principal()``.
"""
from __future__ import annotations

import contextvars
import itertools
import logging
from typing import Any, Callable, Iterator

import grpc

from app.errors import KuraError
from app.extensions.context import HookContext, Principal
from app.extensions.engine import Extensions

log = logging.getLogger("kura.extensions")

_UNHOOKED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
TENANT_METADATA = ("x-kura-tenant-id", "x-tuist-account-handle")
DEFAULT_INSTANCE = "default"

_REAPI = "/build.bazel.remote.execution.v2."
_BYTESTREAM = "/google.bytestream.ByteStream/"

# full method → (route, operation)
METHODS: dict[str, tuple[str, str]] = {
    _REAPI + "Capabilities/GetCapabilities": ("reapi.capabilities.get_capabilities", "capabilities.read"),
    _REAPI + "ActionCache/GetActionResult": ("reapi.action_cache.get_action_result", "artifact.read"),
    _REAPI + "ActionCache/UpdateActionResult": ("reapi.action_cache.update_action_result", "artifact.write"),
    _REAPI + "ContentAddressableStorage/FindMissingBlobs": ("reapi.cas.find_missing_blobs", "artifact.inspect"),
    _REAPI + "ContentAddressableStorage/BatchUpdateBlobs": ("reapi.cas.batch_update_blobs", "artifact.write"),
    _REAPI + "ContentAddressableStorage/BatchReadBlobs": ("reapi.cas.batch_read_blobs", "artifact.read"),
    _REAPI + "ContentAddressableStorage/GetTree": ("reapi.cas.get_tree", "artifact.read"),
    _BYTESTREAM + "Read": ("reapi.bytestream.read", "artifact.read"),
    _BYTESTREAM + "Write": ("reapi.bytestream.write", "artifact.write"),
    _BYTESTREAM + "QueryWriteStatus": ("reapi.bytestream.query_write_status", "artifact.inspect"),
}

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("kura_principal", default=None)


def current_principal() -> Principal | None:
    """The principal the hooks returned for the RPC running in this thread."""
    return _principal.get()


def grpc_status_for(exc: KuraError) -> grpc.StatusCode:
    """401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, ..."""
    status = exc.http_status
    if status in _GRPC_CODES:
        return _GRPC_CODES[status]
    return grpc.StatusCode.PERMISSION_DENIED if 400 <= status < 500 else grpc.StatusCode.UNAVAILABLE


def route_for(method: str) -> tuple[str, str]:
    """(route, operation) for a full gRPC method name; unknown methods are ``request``."""
    known = METHODS.get(method)
    if known is not None:
        return known
    service, _, name = method.strip("/").rpartition("/")
    return f"grpc.{service.rsplit('.', 1)[-1].lower()}.{name.lower()}", "request"


def metadata_headers(metadata: Any) -> dict[str, str]:
    """Call metadata as lower-case headers (first value wins; binary ``-bin`` keys skipped)."""
    headers: dict[str, str] = {}
    for key, value in metadata or ():
        key = key.lower()
        if key.endswith("-bin") or key in headers:
            continue
        headers[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return headers


def parse_resource_name(resource_name: str) -> tuple[str, str | None, str | None]:
    """ByteStream resource → (namespace, artifact_key, artifact_hash).

    ``[{instance}/]blobs/{hash}/{size}`` or ``[{instance}/]uploads/{uuid}/blobs/{hash}/{size}[/...]``;
    an empty instance is the ``default`` namespace. Unparseable names yield the
    default namespace and no key (the servicer rejects them afterwards).
    """
    parts = resource_name.split("/")
    for index, part in enumerate(parts):
        if part == "blobs" and len(parts) >= index + 3:
            instance_parts = parts[:index]
            if len(instance_parts) >= 2 and instance_parts[-2] == "uploads":
                instance_parts = instance_parts[:-2]
            namespace = "/".join(instance_parts) or DEFAULT_INSTANCE
            digest_hash, size = parts[index + 1], parts[index + 2]
            return namespace, f"blob/{digest_hash}/{size}", digest_hash
    return DEFAULT_INSTANCE, None, None


def context_for(method: str, metadata: Any, request: Any, server_tenant_id: str) -> HookContext:
    """The ``HookContext`` of a REAPI call, given its first request message (or None)."""
    route, operation = route_for(method)
    headers = metadata_headers(metadata)
    tenant = next((headers[h].strip() for h in TENANT_METADATA if headers.get(h, "").strip()), None)
    namespace: str | None = None
    artifact_key = artifact_hash = None
    resource_name = getattr(request, "resource_name", None) if request is not None else None
    if isinstance(resource_name, str) and resource_name:
        namespace, artifact_key, artifact_hash = parse_resource_name(resource_name)
    elif request is not None and isinstance(getattr(request, "instance_name", None), str):
        namespace = request.instance_name or DEFAULT_INSTANCE
    elif route != "reapi.capabilities.get_capabilities" and method in METHODS:
        namespace = DEFAULT_INSTANCE
    if operation == "artifact.write":
        artifact_key = artifact_hash = None  # as Kura: writes are authorised per namespace
    return HookContext(transport="grpc", route=route, method="RPC", operation=operation,
                       server_tenant_id=server_tenant_id, tenant_id=tenant, namespace_id=namespace,
                       producer="reapi", artifact_key=artifact_key, artifact_hash=artifact_hash,
                       headers=headers, query={})


class ExtensionsInterceptor(grpc.ServerInterceptor):
    """Runs ``Extensions.check`` before every hooked RPC's servicer."""

    def __init__(self, extensions: Extensions, server_tenant_id: str, *, abort_on_deny: bool = False) -> None:
        self._extensions = extensions
        self._tenant = server_tenant_id
        self._abort = abort_on_deny

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNHOOKED_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_request(method, metadata, handler.unary_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_request(method, metadata, handler.unary_stream), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_request(method, metadata, handler.stream_unary), **kwargs)
        return grpc.stream_stream_rpc_method_handler(
            self._stream_request(method, metadata, handler.stream_stream), **kwargs)

    def check(self, context: grpc.ServicerContext, ctx: HookContext) -> Principal | None:
        """Run the hooks for ``ctx``; on deny raise (default) or abort the call."""
        try:
            principal = self._extensions.check(ctx)
        except KuraError as exc:
            if self._abort:
                context.abort(grpc_status_for(exc), exc.message)
            raise
        _principal.set(principal)
        return principal

    def _unary_request(self, method: str, metadata: Any, behavior: Callable[[Any, Any], Any]
                       ) -> Callable[[Any, Any], Any]:
        def hooked(request: Any, context: grpc.ServicerContext) -> Any:
            self.check(context, context_for(method, metadata, request, self._tenant))
            return behavior(request, context)
        return hooked

    def _stream_request(self, method: str, metadata: Any, behavior: Callable[[Iterator[Any], Any], Any]
                        ) -> Callable[[Iterator[Any], Any], Any]:
        def hooked(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            first = next(requests, None)
            self.check(context, context_for(method, metadata, first, self._tenant))
            replay = iter(()) if first is None else iter((first,))
            return behavior(itertools.chain(replay, requests), context)
        return hooked


def authorize_grpc(extensions: Extensions, context: grpc.ServicerContext, ctx: HookContext) -> Principal | None:
    """For servicers that need an extra, finer check (e.g. per digest): aborts the call on deny."""
    try:
        return extensions.check(ctx)
    except KuraError as exc:
        context.abort(grpc_status_for(exc), exc.message)
        raise  # unreachable: abort raises
