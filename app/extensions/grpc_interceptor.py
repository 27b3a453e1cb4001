"""gRPC server interceptor that runs the hooks for every REAPI call (REAPI process only).

This is the only module of ``app.extensions`` that imports ``grpc``; the HTTP
workers must never import it.

``HandlerCallDetails`` carries the method and metadata but not the request, and
the REAPI namespace lives in the request (``instance_name``, or the ByteStream
``resource_name``). So the interceptor wraps the method handler: for a unary
request it reads the request it is handed, for a client stream (ByteStream
Write) it takes the first message and puts it back in front of the stream.

What the hooks are told comes from the servicers' own parsers
(``app.reapi.hook_targets``: namespace, artifact key and hash;
``app.reapi.tenancy``: headers and tenant), and a request they reject is
answered INVALID_ARGUMENT before any hook runs. A served method with no rule
is refused (fail closed). Probes (health checks, reflection) are not hooked.

Denials are raised as the ``KuraError`` from ``Extensions.check``; the
observer (``app.reapi.observer.RpcObserver``, listed before this interceptor
in ``build_server``) maps them with ``app.reapi.errors.status_for``, the one
gRPC error map, and counts them.

``response_headers`` (as Kura): on a call that succeeds, the hook's headers are
sent as the call's initial metadata, with ``ctx.status_code = 200``; a call
that fails gets none. For unary responses they are sent when the servicer
returns, for streamed responses (ByteStream Read, GetTree) once the servicer
has produced its first message (a missing blob fails before that). The
``ctx`` is the request's, as for HTTP (Kura hands the hook the response's
still-empty metadata instead). Names that gRPC cannot carry as ASCII metadata
(``-bin``, ``grpc-*``, transport headers, non-printable values) are dropped
with a warning: the hook fails open.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from typing import Any, Callable, Iterator

import grpc

from app.errors import BadRequest, Forbidden
from app.extensions.context import HookContext, Principal
from app.extensions.engine import Extensions
from app.reapi.cache import PRODUCER
from app.reapi.hook_targets import RULES, RpcRule
from app.reapi.observer import PROBE_PREFIXES
from app.reapi.tenancy import call_headers, requested_tenant

log = logging.getLogger("kura.extensions")

# The HTTP-equivalent status of a call that succeeded (Kura passes 200).
OK_STATUS_CODE = 200
_METADATA_KEY = re.compile(r"[0-9a-z_.\-]+")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")
_TRANSPORT_HEADERS = frozenset(("content-type", "te", "user-agent", "content-length", "host",
                                "connection", "transfer-encoding"))
_END = object()


def response_metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The ``response_headers`` result as gRPC metadata; names gRPC cannot carry are dropped."""
    metadata = []
    for name, value in headers.items():
        if (not _METADATA_KEY.fullmatch(name) or name.endswith("-bin") or name.startswith("grpc-")
                or name in _TRANSPORT_HEADERS or not _METADATA_VALUE.fullmatch(value)):
            log.warning("event=extension_response_header_dropped transport=grpc header=%r", name)
            continue
        metadata.append((name, value))
    return tuple(metadata)


class _HookedCall:
    """One call's hook context and principal, from ``authorize`` to ``response_headers``."""

    def __init__(self, interceptor: "ExtensionsInterceptor", rule: RpcRule | None, method: str,
                 metadata: Any, request: Any) -> None:
        if rule is None:
            raise Forbidden(f"No authorization rule for {method}")
        if request is None:
            raise BadRequest("The call carried no request message")
        target = rule.target(request)  # BadRequest here: INVALID_ARGUMENT, no hook ran
        self.extensions = interceptor.extensions
        self.ctx = HookContext(
            transport="grpc", route=rule.route, method="RPC", operation=rule.operation,
            server_tenant_id=interceptor.server_tenant_id, tenant_id=requested_tenant(metadata),
            namespace_id=target.namespace, producer=PRODUCER, artifact_key=target.artifact_key,
            artifact_hash=target.artifact_hash, headers=call_headers(metadata), query={})
        checked = self.ctx if rule.key_in_authorize else dataclasses.replace(
            self.ctx, artifact_key=None, artifact_hash=None)
        self.principal: Principal | None = self.extensions.check(checked)

    def send_response_headers(self, context: grpc.ServicerContext) -> None:
        headers = self.extensions.response_headers(self.ctx, self.principal, OK_STATUS_CODE)
        metadata = response_metadata(headers) if headers else ()
        if metadata:
            context.send_initial_metadata(metadata)


class ExtensionsInterceptor(grpc.ServerInterceptor):
    """Runs ``Extensions.check`` before every hooked RPC's servicer, ``response_headers`` after."""

    def __init__(self, extensions: Extensions, server_tenant_id: str) -> None:
        self.extensions = extensions
        self.server_tenant_id = server_tenant_id

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PROBE_PREFIXES):
            return handler
        start = _CallStart(self, RULES.get(method), method, handler_call_details.invocation_metadata)
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(start.unary_unary(handler.unary_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(start.unary_stream(handler.unary_stream), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(start.stream_unary(handler.stream_unary), **kwargs)
        return grpc.stream_stream_rpc_method_handler(start.stream_stream(handler.stream_stream), **kwargs)


@dataclasses.dataclass(frozen=True)
class _CallStart:
    """Wraps one method's behaviour for each of the four call shapes."""

    interceptor: ExtensionsInterceptor
    rule: RpcRule | None
    method: str
    metadata: Any

    def _hook(self, request: Any) -> _HookedCall:
        return _HookedCall(self.interceptor, self.rule, self.method, self.metadata, request)

    def unary_unary(self, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def hooked(request: Any, context: grpc.ServicerContext) -> Any:
            call = self._hook(request)
            response = behavior(request, context)
            call.send_response_headers(context)
            return response
        return hooked

    def unary_stream(self, behavior: Callable[[Any, Any], Iterator[Any]]
                     ) -> Callable[[Any, Any], Iterator[Any]]:
        def hooked(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._hook(request)
            yield from _with_headers_first(call, behavior(request, context), context)
        return hooked

    def stream_unary(self, behavior: Callable[[Iterator[Any], Any], Any]
                     ) -> Callable[[Iterator[Any], Any], Any]:
        def hooked(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            first = next(requests, None)
            call = self._hook(first)
            response = behavior(itertools.chain((first,), requests), context)
            call.send_response_headers(context)
            return response
        return hooked

    def stream_stream(self, behavior: Callable[[Iterator[Any], Any], Iterator[Any]]
                      ) -> Callable[[Iterator[Any], Any], Iterator[Any]]:
        def hooked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            first = next(requests, None)
            call = self._hook(first)
            responses = behavior(itertools.chain((first,), requests), context)
            yield from _with_headers_first(call, responses, context)
        return hooked


def _with_headers_first(call: _HookedCall, responses: Iterator[Any],
                        context: grpc.ServicerContext) -> Iterator[Any]:
    """Yield ``responses``, sending the response headers once the first one exists."""
    responses = iter(responses)
    first = next(responses, _END)
    call.send_response_headers(context)
    if first is not _END:
        yield first
    yield from responses
