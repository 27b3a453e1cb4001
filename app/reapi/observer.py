"""One server interceptor around every RPC: in-flight count, metrics, logs, error mapping.

This is the REAPI counterpart of BuildGrid's decorator stack: servicers stay
"parse → cache call → response" and raise domain errors; here each call is
counted in the node's shared in-flight counter (``/status/rollout`` shows it as
``grpc_inflight_requests``), timed into ``GRPC_DURATION``, counted by status
code into ``GRPC_REQUESTS``, and any exception is turned into a status with
``app.reapi.errors.status_for`` (the one mapping). The tenant named in the
call's metadata is validated here for every call (``app.reapi.tenancy``), and
while the node drains new calls are refused with UNAVAILABLE (probes excepted).
Each call but the probes has its trace span (``app.tracing``), parented by a
``traceparent`` in its metadata, with the serialized size of the messages it received
and sent (counted only while the call is traced).

Request messages are decoded here too: grpcio answers INTERNAL "Exception
deserializing request!" before any interceptor runs when a handler's deserializer
raises, so each handler gets one that never raises; a message that does not decode
reaches the call as ``UndecodableRequest`` (INVALID_ARGUMENT) through the same map.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import grpc
from google.protobuf.message import Message

from app import metrics, tracing
from app.errors import Draining, TruncatedBody
from app.node_state import NodeState
from app.reapi.errors import UndecodableRequest, status_for
from app.reapi.tenancy import requested_tenant

log = logging.getLogger("kura.reapi")

# Probes keep answering while the node drains (SPEC §3: only non-probe routes get 503), and
# the extension hooks never run for them (SPEC §7).
PROBE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Codes that are part of normal cache traffic (a miss, a client that went away).
_QUIET_CODES = frozenset((grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED))
# How long a stream that ended without its last message waits to be reported cancelled
# instead of truncated (only on that error path).
CANCEL_SETTLE_S = 0.05


def _settle(context: grpc.ServicerContext) -> None:
    """Give a cancellation that is already on its way ``CANCEL_SETTLE_S`` to show."""
    deadline = time.monotonic() + CANCEL_SETTLE_S
    while context.is_active() and time.monotonic() < deadline:
        time.sleep(0.001)


class _Call:
    """Bookkeeping for one RPC from its first byte to its status."""

    span: Any = None  # its trace span, while tracing is on
    received = 0  # serialized bytes of the request messages (counted while traced)
    sent = 0  # serialized bytes of the response messages (counted while traced)

    def __init__(self, observer: "RpcObserver", method: str) -> None:
        self.observer = observer
        self.method = method
        self.probe = method.startswith(PROBE_PREFIXES)
        self.started = time.monotonic()
        self.done = False
        observer.node_state.add_inflight(1)

    def admit(self, context: grpc.ServicerContext) -> None:
        """Refuse new work while the node drains; validate the call's tenant metadata."""
        if tracing.TRACER is not None and not self.probe:
            self.span = tracing.start_grpc_span(self.method, context.invocation_metadata())
        if not self.probe and self.observer.node_state.draining:
            raise Draining()
        requested_tenant(context.invocation_metadata())

    def counted_in(self, request: Any) -> Any:
        """The handler's request (one message, or a stream of them), counted if traced."""
        if self.span is None:
            return request
        if isinstance(request, Message):
            self.received += request.ByteSize()
            return request
        return self._counted(request, inbound=True)

    def counted_out(self, response: Any) -> Any:
        """A unary handler's response message, counted if traced."""
        if self.span is not None and isinstance(response, Message):
            self.sent += response.ByteSize()
        return response

    def counted_stream_out(self, responses: Iterable[Any]) -> Iterable[Any]:
        """A streaming handler's response messages, counted if traced."""
        return responses if self.span is None else self._counted(responses, inbound=False)

    def _counted(self, messages: Iterable[Any], inbound: bool) -> Iterator[Any]:
        for message in messages:
            if inbound:
                self.received += message.ByteSize()
            else:
                self.sent += message.ByteSize()
            yield message

    def fail(self, exc: BaseException, context: grpc.ServicerContext) -> None:
        """Record the status for ``exc`` and abort the call with it (raises)."""
        if isinstance(exc, TruncatedBody):
            # A client that cancels mid-stream ends the request iterator (so the handler
            # raises TruncatedBody) a moment before grpcio marks the call cancelled.
            _settle(context)
        if not context.is_active():
            # The client went away (cancelled or deadline): whatever the handler raised on
            # its way out (often a truncated body), the call's outcome is CANCELLED.
            self.finish(grpc.StatusCode.CANCELLED)
            raise exc
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("event=reapi_internal_error method=%s error=%s", self.method,
                      type(exc).__name__, exc_info=exc)
        elif code not in _QUIET_CODES:
            log.info("event=reapi_rpc_rejected method=%s code=%s message=%r",
                     self.method, code.name, message)
        self.finish(code)
        context.abort(code, message)

    def finish(self, code: grpc.StatusCode) -> None:
        if self.done:
            return
        self.done = True
        elapsed = time.monotonic() - self.started
        self.observer.count(self.method, code, elapsed)
        if not self.probe:  # public calls only: bandwidth pacing (app.replication.pacing)
            self.observer.node_state.note_latency(elapsed)
        if self.span is not None:
            tracing.end_grpc_span(self.span, code, self.received, self.sent)
        # Last: a drain (or a test) that sees zero in flight also sees this call's metrics.
        self.observer.node_state.add_inflight(-1)


@dataclass(frozen=True)
class _Undecodable:
    """What a tolerant deserializer returns for bytes that are not a message of its type."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, whatever its kind
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise UndecodableRequest(f"The request message could not be decoded ({request.error})")
    return request


def _decoded_stream(requests: Iterable[Any]) -> Iterator[Any]:
    for request in requests:
        yield _decoded(request)


class RpcObserver(grpc.ServerInterceptor):
    """Wraps every method handler of the server (health and reflection included)."""

    def __init__(self, node_state: NodeState) -> None:
        self.node_state = node_state
        # Labelled metric children by (method, code) and method: labels() costs more than
        # the cache calls it would time.
        self._requests: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._durations: dict[str, Any] = {}

    def count(self, method: str, code: grpc.StatusCode, elapsed: float) -> None:
        """Record one finished call in GRPC_REQUESTS and GRPC_DURATION."""
        requests = self._requests.get((method, code))
        if requests is None:
            requests = metrics.GRPC_REQUESTS.labels(method, code.name)
            self._requests[(method, code)] = requests
        duration = self._durations.get(method)
        if duration is None:
            duration = metrics.GRPC_DURATION.labels(method)
            self._durations[method] = duration
        requests.inc()
        duration.observe(elapsed)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        kwargs = {"request_deserializer": _tolerant(handler.request_deserializer),
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary, _decoded), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary, _decoded_stream), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream, _decoded), **kwargs)
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(method, handler.stream_stream, _decoded_stream), **kwargs)

    def _unary(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any],
               decoded: Callable[[Any], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self, method)
            try:
                call.admit(context)
                response = call.counted_out(behavior(call.counted_in(decoded(request)), context))
            except Exception as exc:  # noqa: BLE001 - every failure gets a status here
                call.fail(exc, context)
                raise  # unreachable: fail() aborts
            finally:
                if not call.done:
                    call.finish(grpc.StatusCode.OK)
            return response
        return observed

    def _streaming(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
                   decoded: Callable[[Any], Any]
                   ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self, method)
            try:
                call.admit(context)
                yield from call.counted_stream_out(behavior(call.counted_in(decoded(request)), context))
            except GeneratorExit:
                call.finish(grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:  # noqa: BLE001
                call.fail(exc, context)
                raise
            finally:
                if not call.done:
                    call.finish(grpc.StatusCode.OK)
        return observed
