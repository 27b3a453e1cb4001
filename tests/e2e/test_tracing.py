"""OpenTelemetry traces of real nodes, exported over OTLP/HTTP to a receiver in this process
that decodes each export as the collector does (``ExportTraceServiceRequest``)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from app import tracing
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.settings import ConfigError, Settings
from tests.mesh import TENANT, gradle_path, make_mesh, start, wait_until
from tests.nodes import REPO
from tests.reapi.reapi_client import Reapi, digest_of, read_resource, upload_resource, write_requests

CAS = "build.bazel.remote.execution.v2.ContentAddressableStorage"
BYTESTREAM = "google.bytestream.ByteStream"


@dataclass(frozen=True)
class ExportedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: int


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on loopback (``url``) that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.bad_requests: list[str] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
                    receiver.bad_requests.append(f"{self.path} {self.headers['Content-Type']}")
                export = ExportTraceServiceRequest.FromString(body)
                spans = []
                for resource_spans in export.resource_spans:
                    resource = _attributes(resource_spans.resource.attributes)
                    for scope_spans in resource_spans.scope_spans:
                        spans.extend(ExportedSpan(
                            s.name, s.kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                            _attributes(s.attributes), resource, s.status.code)
                            for s in scope_spans.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                with receiver.arrived:
                    receiver.spans.extend(spans)
                    receiver.arrived.notify_all()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate: Callable[[ExportedSpan], bool], what: str,
                 timeout: float = 15.0) -> ExportedSpan:
        """The first span ``predicate`` accepts, once it has arrived."""
        with self.arrived:
            found = self.arrived.wait_for(lambda: next(filter(predicate, self.spans), None), timeout)
        assert found is not None, f"no span {what} in {[s.name for s in self.spans]}"
        return found


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.server.shutdown()


def traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent from a client's span: (header, trace id, span id)."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def tracing_env(receiver: OtlpReceiver, service: str) -> dict[str, str]:
    return {"KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url, "KURA_OTEL_SERVICE_NAME": service,
            "KURA_OTEL_DEPLOYMENT_ENVIRONMENT": "ci"}


def named(name: str, **attributes: Any) -> Callable[[ExportedSpan], bool]:
    return lambda s: s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())


def test_http_requests_and_grpc_calls_are_spans_parented_by_the_clients_traceparent(
        node_factory, receiver: OtlpReceiver) -> None:
    node = node_factory(KURA_HTTP_WORKERS="1", **tracing_env(receiver, "kura-test-0"))
    base = node.url + "/api/cache/gradle/traced?tenant_id=" + TENANT
    body = os.urandom(5000)

    upload, upload_trace, upload_parent = traceparent()
    assert requests.put(base, data=body, headers={"traceparent": upload}, timeout=10).status_code == 201
    download, download_trace, download_parent = traceparent()  # a hit: the fast path answers it
    assert requests.get(base, headers={"traceparent": download}, timeout=10).content == body
    assert requests.get(base.replace("traced", "absent"), timeout=10).status_code == 404
    assert requests.get(node.url + "/up", timeout=10).status_code == 200
    call, call_trace, call_parent = traceparent()
    client = Reapi.connect(int(node.env["KURA_GRPC_PORT"]))
    find = re_pb2.FindMissingBlobsRequest(blob_digests=[digest_of(b"nope")])
    blob = os.urandom(3000)
    writes = list(write_requests(blob, upload_resource(digest_of(blob)), chunk=1000))
    read = bs_pb2.ReadRequest(resource_name=read_resource(digest_of(blob)))
    try:
        missing = client.cas.FindMissingBlobs(find, metadata=[("traceparent", call)], timeout=10)
        assert len(missing.missing_blob_digests) == 1
        written = client.bytestream.Write(iter(writes), timeout=10)  # a stream in
        chunks = list(client.bytestream.Read(read, timeout=10))  # a stream out
        assert b"".join(c.data for c in chunks) == blob
    finally:
        client.close()
    roles = node.children()
    assert node.stop() == 0  # each process exports its queued spans on its way out

    route = "/api/cache/gradle/{cache_key}"
    put = receiver.wait_for(named(f"PUT {route}"), "for the upload")
    assert (put.trace_id, put.parent_span_id) == (upload_trace, upload_parent)
    assert put.kind == SpanProto.SPAN_KIND_SERVER
    assert put.attributes == {"http.request.method": "PUT", "http.route": route,
                              "url.path": "/api/cache/gradle/traced", "http.request.body.size": 5000,
                              "http.response.status_code": 201, "http.response.body.size": 0}
    get = receiver.wait_for(named(f"GET {route}", **{"http.response.status_code": 200}), "for the hit")
    assert (get.trace_id, get.parent_span_id) == (download_trace, download_parent)
    assert get.attributes["http.response.body.size"] == 5000
    miss = receiver.wait_for(named(f"GET {route}", **{"http.response.status_code": 404}), "for the miss")
    assert miss.parent_span_id == "" and miss.trace_id not in (upload_trace, download_trace)
    grpc_span = receiver.wait_for(named(f"{CAS}/FindMissingBlobs"), "for the gRPC call")
    assert (grpc_span.trace_id, grpc_span.parent_span_id) == (call_trace, call_parent)
    assert grpc_span.attributes == {"rpc.system": "grpc", "rpc.service": CAS, "rpc.method": "FindMissingBlobs",
                                    "rpc.grpc.status_code": 0, "kura.rpc.request.bytes": find.ByteSize(),
                                    "kura.rpc.response.bytes": missing.ByteSize()}
    # The serialized bytes each way, streams summed.
    write_span = receiver.wait_for(named(f"{BYTESTREAM}/Write"), "for the streamed write")
    assert write_span.attributes["kura.rpc.request.bytes"] == sum(w.ByteSize() for w in writes)
    assert write_span.attributes["kura.rpc.response.bytes"] == written.ByteSize()
    read_span = receiver.wait_for(named(f"{BYTESTREAM}/Read"), "for the streamed read")
    assert read_span.attributes["kura.rpc.request.bytes"] == read.ByteSize()
    assert read_span.attributes["kura.rpc.response.bytes"] == sum(c.ByteSize() for c in chunks) > len(blob)
    for span, process, role in ((put, "http", "worker"), (get, "http", "worker"), (grpc_span, "reapi", "reapi")):
        assert [span.resource["process.pid"]] == roles[role]
        assert span.resource["service.name"] == "kura-test-0"
        assert span.resource["deployment.environment"] == "ci"
        assert span.resource["deployment.environment.name"] == "ci"
        assert span.resource["service.namespace"] == "kura"
        assert span.resource["kura.tenant_id"] == TENANT
        assert span.resource["kura.process"] == process
    assert not [s for s in receiver.spans if s.name == "GET /up"]  # probes have no spans
    assert receiver.bad_requests == []


def test_every_http_worker_exports_its_own_spans_and_every_process_flushes_at_exit(
        node_factory, receiver: OtlpReceiver) -> None:
    node = node_factory(KURA_HTTP_WORKERS="2", **tracing_env(receiver, "kura-workers"))
    workers = node.children()["worker"]
    assert len(workers) == 2
    base = node.url + "/api/cache/gradle/{key}?tenant_id=" + TENANT
    # The workers share one listening socket: with one of them stopped, the other accepts.
    for paused, serving in ((workers[0], workers[1]), (workers[1], workers[0])):
        os.kill(paused, signal.SIGSTOP)
        try:
            response = requests.put(base.format(key=f"by-{serving}"), data=b"x",
                                    headers={"Connection": "close"}, timeout=10)
        finally:
            os.kill(paused, signal.SIGCONT)
        assert response.status_code == 201
    assert node.stop() == 0

    for pid in workers:
        span = receiver.wait_for(lambda s, pid=pid: s.attributes.get("url.path") == f"/api/cache/gradle/by-{pid}",
                                 f"from worker {pid}")
        assert (span.resource["kura.process"], span.resource["process.pid"]) == ("http", pid)
    log = node.log()
    # Each of the four processes (two workers, the REAPI process, the replicator) started its
    # own tracer provider and, stopping, exported what it still held within the bound.
    assert log.count("event=tracing_started process=http ") == 2
    assert log.count("event=tracing_started process=reapi ") == 1
    assert log.count("event=tracing_started process=replicator ") == 1
    assert log.count("event=tracing_stopped flushed=true") == 4, log


def test_an_outbox_delivery_is_a_span_that_the_peers_request_continues(
        tmp_path: Path, receiver: OtlpReceiver) -> None:
    a, b = make_mesh(tmp_path, ["a", "b"])
    a.node.env.update(tracing_env(receiver, "kura-a"))
    b.node.env.update(tracing_env(receiver, "kura-b"))
    start([a, b])
    body = os.urandom(3000)
    assert a.put(gradle_path("replicated"), body).status_code == 201
    wait_until(lambda: b.get(gradle_path("replicated")).content == body, 15, "the write to reach b")
    for member in (a, b):
        member.node.signal(signal.SIGTERM)
    assert (a.node.stop(), b.node.stop()) == (0, 0)  # both exported their queued spans

    delivery = receiver.wait_for(lambda s: named("kura.outbox.deliver", **{"kura.peer": b.advertised})(s)
                                 and s.status != Status.STATUS_CODE_ERROR, "for the delivery to b")
    assert delivery.resource["service.name"] == "kura-a"
    assert delivery.resource["kura.process"] == "replicator"
    assert delivery.kind == SpanProto.SPAN_KIND_CLIENT
    assert delivery.attributes["kura.artifact.count"] == 1
    assert delivery.attributes["kura.artifact.bytes"] > len(body)  # framed: body plus its fields
    received = receiver.wait_for(lambda s: s.parent_span_id == delivery.span_id, "continuing the delivery")
    assert (received.name, received.trace_id) == ("POST /_internal/replicate/batch", delivery.trace_id)
    assert received.resource["service.name"] == "kura-b"
    assert received.attributes["http.response.status_code"] == 200
    # Each node bootstrapped from the other when the mesh formed: one span per pass (a pass
    # tried before the peer answered is a span too, with its error).
    bootstrap = receiver.wait_for(named("kura.bootstrap.pass", **{"kura.peer": a.advertised,
                                                                  "kura.bootstrap.result": "ok"}),
                                  "for b's clean bootstrap pass from a")
    assert bootstrap.resource["service.name"] == "kura-b"
    assert bootstrap.status != Status.STATUS_CODE_ERROR
    assert bootstrap.attributes["kura.bootstrap.artifacts_failed"] == 0
    # The pass's requests to the peer carry it: a's internal API continued it.
    pages = receiver.wait_for(lambda s: s.parent_span_id == bootstrap.span_id, "continuing the pass")
    assert pages.name.startswith("GET /_internal/bootstrap/") and pages.resource["service.name"] == "kura-a"


# What the HTTP and gRPC request paths load and start with the endpoint unset (or set).
PROBE = """
import json, sys, threading
from app import tracing
from app.http import create_app
from app.reapi.server import build_server
from app.settings import Settings
from tests.reapi.reapi_client import Reapi, digest_of

settings = Settings.from_env()
on = tracing.start(settings, "http")
app = create_app(settings)
client = app.test_client()
assert client.put("/api/cache/gradle/k?tenant_id=default", data=b"x").status_code == 201
assert client.get("/api/cache/gradle/k?tenant_id=default").status_code == 200
node = app.extensions["kura"]
running = build_server(settings, node.store, node.node_state, host="127.0.0.1", port=0)
reapi = Reapi.connect(running.port)
reapi.missing([digest_of(b"y")])
print(json.dumps({"on": on, "threads": [t.name for t in threading.enumerate()],
                  "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
reapi.close()
tracing.shutdown()
running.stop(0)
"""


def probe(tmp_path: Path, **env: str) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KURA_")}
    environ.update(KURA_DATA_DIR=str(tmp_path / "data"), **env)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_with_the_endpoint_unset_nothing_of_opentelemetry_is_loaded_or_started(
        tmp_path: Path, receiver: OtlpReceiver) -> None:
    # The SDK's own variable names the receiver: were an exporter built with its defaults,
    # it would send there.
    off = probe(tmp_path / "off", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.url)
    assert off["on"] is False and off["otel"] == []
    assert not [name for name in off["threads"] if "Otel" in name], off["threads"]
    on = probe(tmp_path / "on", KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.url)
    assert on["on"] and "OtelBatchSpanRecordProcessor" in on["threads"]
    receiver.wait_for(named("PUT /api/cache/gradle/{cache_key}"), "from the probe with tracing on")
    assert {s.resource["kura.process"] for s in receiver.spans} == {"http"}
    assert len([s for s in receiver.spans if s.name.startswith("PUT")]) == 1


def test_a_node_without_the_endpoint_exports_nothing(node_factory, receiver: OtlpReceiver) -> None:
    node = node_factory(KURA_HTTP_WORKERS="1", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.url)
    base = node.url + "/api/cache/gradle/untraced?tenant_id=" + TENANT
    assert requests.put(base, data=b"x", headers={"traceparent": traceparent()[0]}, timeout=10).ok
    assert requests.get(base, timeout=10).content == b"x"
    assert node.stop() == 0  # every process flushes what it has at exit
    assert receiver.spans == [] and "event=tracing_started" not in node.log()


@pytest.mark.parametrize("endpoint", ["grpc://otel-collector:4317", "otel-collector:4318/v1/traces",
                                      "http://:4318/v1/traces", "http://otel-collector:traces/v1/traces"])
def test_an_endpoint_that_is_not_an_http_url_stops_the_node_at_start(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        Settings.from_env({"KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})


def test_tracing_settings_and_their_defaults() -> None:
    assert (Settings().otlp_traces_endpoint, Settings().otel_service_name,
            Settings().otel_deployment_environment) == ("", "kura", "production")
    settings = Settings.from_env({"KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": " https://c.example:4318/v1/traces ",
                                  "KURA_OTEL_SERVICE_NAME": "cache-eu-0",
                                  "KURA_OTEL_DEPLOYMENT_ENVIRONMENT": "staging"})
    assert (settings.otlp_traces_endpoint, settings.otel_service_name,
            settings.otel_deployment_environment) == ("https://c.example:4318/v1/traces", "cache-eu-0", "staging")


def test_an_endpoint_without_a_path_is_used_as_is_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # As Kura: the URL is the exporter's, unchanged (no /v1/traces appended); the node starts.
    settings = Settings.from_env({"KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/",
                                  "KURA_DATA_DIR": str(tmp_path)})
    assert settings.otlp_traces_endpoint == "http://127.0.0.1:9/"
    with caplog.at_level(logging.WARNING, logger="kura.tracing"):
        try:
            assert tracing.start(settings, "http")
        finally:
            tracing.shutdown(timeout_s=0.1)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "event=tracing_endpoint_without_path endpoint=http://127.0.0.1:9/ "
        "hint=the OTLP/HTTP traces path is usually /v1/traces"]
    assert tracing.TRACER is None
