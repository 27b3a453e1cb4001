"""OpenTelemetry traces, Kura's way: on only when KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.

Each process of a node (every HTTP worker, the REAPI process, the replicator) calls
:func:`start` itself, after any fork and never in the gunicorn master, and :func:`shutdown`
on its way out. With the endpoint set, ``start`` builds that process's tracer provider:
spans go through a ``BatchSpanProcessor`` (a bounded queue: when the collector is slow or
gone, spans are dropped, requests never wait) to the OTLP/HTTP exporter (protobuf,
``EXPORT_TIMEOUT_S`` per export) at the endpoint's URL as given, as Kura's exporter does.
The resource carries Kura's attributes (``service.name``, ``service.namespace``,
``service.version``, ``deployment.environment.name``, ``kura.region``, ``kura.tenant_id``,
``service.instance.id``) plus ``kura.process`` and ``process.pid``.

Off (the default), nothing of OpenTelemetry is even imported and :data:`TRACER` stays None:
every hook on a request path tests that one global and does nothing else.

Spans: one per public HTTP request (probes excepted; ``app.http.instrumentation`` and the
download fast path), per internal-API request, per gRPC call (``app.reapi.observer``), per
outbox batch delivered to a peer (``app.replication.drain``) and per bootstrap pass
(``app.replication.bootstrap``). W3C trace context: an incoming ``traceparent`` (HTTP
header or gRPC metadata) becomes the parent of the request's span, and peer requests carry
the current span's (:func:`inject`), as Kura's ``inject_current_trace_context``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from app.replication.readiness import BootstrapProgress
    from app.settings import Settings

log = logging.getLogger("kura.tracing")

# The tracer of this process; None while tracing is off (the only thing hooks look at).
TRACER: "Tracer | None" = None
_provider: "TracerProvider | None" = None
_propagator: Any = None  # W3C trace context (traceparent, tracestate)

EXPORT_TIMEOUT_S = 3.0  # as Kura's exporter
SCHEDULE_DELAY_MS = 5000  # a batch leaves at the latest this long after its first span
MAX_QUEUE_SPANS = 2048  # per process; beyond it new spans are dropped
MAX_EXPORT_BATCH = 512
FLUSH_ON_EXIT_S = 1.0  # what is queued at exit gets this long (a gone collector costs no more)

PROPAGATION_HEADERS = ("traceparent", "tracestate")
SERVICE_NAMESPACE = "kura"
DELIVERY_SPAN = "kura.outbox.deliver"
NAMESPACE_DELETE_SPAN = "kura.outbox.delete_namespace"
BOOTSTRAP_SPAN = "kura.bootstrap.pass"
ATTR_PEER = "kura.peer"
# gRPC codes a server span reports as an error (OpenTelemetry's RPC conventions).
_GRPC_SERVER_ERRORS = frozenset(("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL",
                                 "UNAVAILABLE", "DATA_LOSS"))

F = TypeVar("F", bound=Callable[..., Any])
DROP_WARNING_EVERY_S = 60.0


class _Sparse(logging.Filter):
    """Lets one record through per ``every_s``: the SDK warns once per span it drops from
    a full queue, which a node under load with its collector gone would pay per request."""

    def __init__(self, every_s: float) -> None:
        super().__init__()
        self.every_s = every_s
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every_s
        return True


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kura-py")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def start(settings: "Settings", process: str) -> bool:
    """Set up this process's tracer provider when tracing is configured; True if it is on.

    ``process``: ``http``, ``reapi`` or ``replicator`` (the ``kura.process`` attribute).
    Call it after any fork and after gevent's monkey patching where there is one: the
    batch processor's worker is a thread (a greenlet under gevent)."""
    global TRACER, _provider, _propagator
    if not settings.otlp_traces_endpoint or TRACER is not None:
        return TRACER is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    resource = Resource({
        "service.name": settings.otel_service_name,
        "service.namespace": SERVICE_NAMESPACE,
        "service.version": _version(),
        "deployment.environment.name": settings.otel_deployment_environment,
        # The older semantic-conventions key, which many backends still group by.
        "deployment.environment": settings.otel_deployment_environment,
        "kura.region": settings.region,
        "kura.tenant_id": settings.tenant_id,
        "service.instance.id": settings.resolved_node_url,
        # Beyond Kura's (one process per node there): which process of the node, and
        # which of its several HTTP workers.
        "kura.process": process,
        "process.pid": os.getpid(),
    })
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False)
    exporter = OTLPSpanExporter(endpoint=settings.otlp_traces_endpoint, timeout=EXPORT_TIMEOUT_S)
    provider.add_span_processor(BatchSpanProcessor(
        exporter, max_queue_size=MAX_QUEUE_SPANS, schedule_delay_millis=SCHEDULE_DELAY_MS,
        max_export_batch_size=MAX_EXPORT_BATCH))
    logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(_Sparse(DROP_WARNING_EVERY_S))
    _provider, _propagator = provider, TraceContextTextMapPropagator()
    TRACER = provider.get_tracer("kura")
    log.info("event=tracing_started process=%s endpoint=%s service_name=%s deployment_environment=%s",
             process, settings.otlp_traces_endpoint, settings.otel_service_name,
             settings.otel_deployment_environment)
    if urlsplit(settings.otlp_traces_endpoint).path in ("", "/"):
        # Used as is, as Kura does: a collector takes OTLP/HTTP spans at /v1/traces.
        log.warning("event=tracing_endpoint_without_path endpoint=%s hint=%s",
                    settings.otlp_traces_endpoint, "the OTLP/HTTP traces path is usually /v1/traces")
    return True


def shutdown(timeout_s: float = FLUSH_ON_EXIT_S) -> None:
    """Stop tracing in this process: export what is queued, for at most ``timeout_s``."""
    global TRACER, _provider
    provider, _provider, TRACER = _provider, None, None
    if provider is None:
        return
    # The SDK's own shutdown waits up to 30 s for a collector that does not answer.
    flusher = threading.Thread(target=provider.shutdown, name="kura-tracing-shutdown", daemon=True)
    flusher.start()
    flusher.join(timeout_s)
    log.info("event=tracing_stopped flushed=%s", str(not flusher.is_alive()).lower())


# -- propagation ---------------------------------------------------------------------

def carrier(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The W3C trace-context entries of ``(name, value)`` pairs (gunicorn's upper-case
    request headers, gRPC metadata), keyed by their lower-case names."""
    found: dict[str, str] = {}
    for name, value in pairs:
        lowered = name.lower()
        if lowered in PROPAGATION_HEADERS:
            found[lowered] = value
    return found


def inject(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` plus the current span's ``traceparent`` (and ``tracestate``), if any
    (tracing on only)."""
    out = dict(headers or {})
    _propagator.inject(out)
    return out


def carry(fn: F, span: "Span | None" = None) -> F:
    """``fn``, to run in another greenlet within this one's trace context (or ``span``'s):
    a spawned greenlet starts with an empty context. Off, ``fn`` itself."""
    if TRACER is None:
        return fn
    from opentelemetry import context, trace

    captured = trace.set_span_in_context(span) if span is not None else context.get_current()

    def within(*args: Any, **kwargs: Any) -> Any:
        token = context.attach(captured)
        try:
            return fn(*args, **kwargs)
        finally:
            context.detach(token)

    return within  # type: ignore[return-value]


# -- spans -----------------------------------------------------------------------------

def _server_span(name: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> "Span":
    from opentelemetry.trace import SpanKind

    assert TRACER is not None
    parent = _propagator.extract(headers)
    return TRACER.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def start_http_span(method: str, route: str, path: str, headers: Mapping[str, str],
                    request_bytes: int | None) -> "Span":
    """The span of one HTTP request; ``route`` is its template (the metrics' label)."""
    attributes: dict[str, Any] = {"http.request.method": method, "http.route": route, "url.path": path}
    if request_bytes is not None:
        attributes["http.request.body.size"] = request_bytes
    return _server_span(f"{method} {route}", headers, attributes)


def set_http_response(span: "Span", method: str, status: int, content_length: int | None) -> None:
    """Status and body size (the Content-Length; a HEAD answer has no body) of the answer."""
    span.set_attribute("http.response.status_code", status)
    if content_length is not None:
        span.set_attribute("http.response.body.size", 0 if method == "HEAD" else content_length)
    if status >= 500:
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR)


def end_span(span: "Span", error: BaseException | None = None) -> None:
    """End ``span``, recording ``error`` (what cut the request short) if there is one."""
    if error is not None:
        from opentelemetry.trace import StatusCode

        span.record_exception(error)
        span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
    span.end()


def start_grpc_span(method: str, metadata: Iterable[tuple[str, str]]) -> "Span":
    """The span of one gRPC call; ``method`` is ``/package.Service/Method``."""
    service, _, name = method.lstrip("/").partition("/")
    return _server_span(method.lstrip("/"), carrier(metadata),
                        {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


def end_grpc_span(span: "Span", code: Any, received: int, sent: int) -> None:
    """End a gRPC call's span with its status (a ``grpc.StatusCode``; grpc is not imported
    here: the HTTP workers load this module too) and the serialized bytes of the messages
    it received and sent."""
    span.set_attributes({"rpc.grpc.status_code": code.value[0], "kura.rpc.request.bytes": received,
                         "kura.rpc.response.bytes": sent})
    if code.name in _GRPC_SERVER_ERRORS:
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR, code.name)
    span.end()


_OFF = contextlib.nullcontext()


def _peer_call(name: str, peer: str, attributes: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """A client span around requests to ``peer``, current while they run (so :func:`inject`
    puts it in them); an exception leaving it marks it failed."""
    from opentelemetry.trace import SpanKind

    assert TRACER is not None
    return TRACER.start_as_current_span(name, kind=SpanKind.CLIENT, attributes={ATTR_PEER: peer, **attributes})


def outbox_delivery(peer: str, artifacts: int, nbytes: int) -> contextlib.AbstractContextManager[Any]:
    """The span of one outbox batch sent to ``peer`` (off: a no-op)."""
    if TRACER is None:
        return _OFF
    return _peer_call(DELIVERY_SPAN, peer, {"kura.artifact.count": artifacts, "kura.artifact.bytes": nbytes})


def outbox_namespace_delete(peer: str) -> contextlib.AbstractContextManager[Any]:
    """The span of one namespace delete sent to ``peer`` (off: a no-op)."""
    if TRACER is None:
        return _OFF
    return _peer_call(NAMESPACE_DELETE_SPAN, peer, {})


def begin_bootstrap_pass(peer: str, attempt: int) -> "Span | None":
    """The span of one bootstrap pass from ``peer``, ended by :func:`end_bootstrap_pass`
    (None while tracing is off). Its requests carry it when run under :func:`carry`."""
    if TRACER is None:
        return None
    return TRACER.start_span(BOOTSTRAP_SPAN, attributes={ATTR_PEER: peer, "kura.bootstrap.attempt": attempt})


def end_bootstrap_pass(span: "Span | None", result: str, progress: "BootstrapProgress") -> None:
    """End a pass's span with its outcome (``ok``/``error``) and its counts."""
    if span is None:
        return
    span.set_attributes({
        "kura.bootstrap.result": result,
        "kura.bootstrap.tombstones_applied": progress.tombstones_applied,
        "kura.bootstrap.buckets_divergent": progress.buckets_divergent,
        "kura.bootstrap.artifacts_applied": progress.artifacts_applied,
        "kura.bootstrap.artifacts_ignored": progress.artifacts_ignored,
        "kura.bootstrap.artifacts_failed": progress.artifacts_failed,
        "kura.bootstrap.bytes": progress.bytes,
    })
    if result != "ok":
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR, progress.last_error)
    span.end()


# -- Flask apps ----------------------------------------------------------------------------
# The span of the current Flask request lives in ``flask.g`` from the request's first hook
# to its teardown. The public app calls these from its own hooks (app.http.instrumentation);
# the internal peer API has them installed by :func:`instrument`.

def begin_flask_request(route: str) -> None:
    """Open the span of the current Flask request; ``route`` is its template."""
    from flask import g, request

    g.kura_span = start_http_span(request.method, route, request.path, request.headers,
                                  request.content_length)


def note_flask_response(response: Any) -> None:
    """Record the answer of the current Flask request on its span, if it has one."""
    from flask import g, request

    span = g.get("kura_span")
    if span is not None:
        set_http_response(span, request.method, response.status_code, response.content_length)


def end_flask_request(error: BaseException | None) -> None:
    """End the span of the current Flask request, if it has one (its teardown)."""
    from flask import g

    span = g.pop("kura_span", None)
    if span is not None:
        end_span(span, error)


def instrument(app: "Flask", untraced: Iterable[str] = ()) -> None:
    """Give every request of ``app`` but those of the ``untraced`` endpoints a span (route:
    the matched rule) when tracing is on in this process. Call it where the app is built,
    after :func:`start`; off, ``app`` is left as it is."""
    if TRACER is None:
        return
    from flask import request

    skipped = frozenset(untraced)

    def before() -> None:
        if request.endpoint not in skipped:
            rule = request.url_rule
            begin_flask_request(rule.rule if rule is not None else "unmatched")

    def after(response: Any) -> Any:
        note_flask_response(response)
        return response

    app.before_request_funcs.setdefault(None, []).insert(0, before)
    app.after_request(after)
    app.teardown_request(end_flask_request)
