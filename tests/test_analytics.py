"""Analytics webhooks against a real local HTTP receiver."""
from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from prometheus_client import REGISTRY

from app.analytics import Analytics, event_for
from app.settings import Settings

KEY = "s3cret-signing-key"


class Receiver:
    """A webhook receiver on loopback that records requests; it can fail or hang on demand."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        self.hang_s = 0.0
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hang_s:
                    time.sleep(receiver.hang_s)
                with receiver.arrived:
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()},
                                              body))
                    receiver.arrived.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, timeout), self.requests


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def dropped() -> float:
    return REGISTRY.get_sample_value("kura_analytics_events_total",
                                     {"pipeline": "queue", "result": "dropped"}) or 0.0


def analytics_for(receiver: Receiver, **overrides: object) -> Analytics:
    settings = Settings(node_url="https://cache-eu-1.example.com:7443", analytics_server_url=receiver.url,
                        analytics_signing_key=KEY, **overrides)
    analytics = Analytics(settings)
    analytics.start()
    return analytics


def test_payload_signature_and_headers_are_exactly_kuras(receiver: Receiver) -> None:
    analytics = analytics_for(receiver, analytics_batch_size=2)
    analytics.record("xcode", "acme", "ios", "blob/cas-1", "upload", 42)
    analytics.record("gradle", "acme", "android", "gradle-key", "download", 64)
    analytics.record("xcode", "acme", "ios", "blob/cas-2", "download", 7)  # fills the xcode batch
    receiver.wait_for(1)
    path, headers, body = receiver.requests[0]
    assert path == "/webhooks/cache"
    assert body == (b'{"events":[{"account_handle":"acme","project_handle":"ios","action":"upload",'
                    b'"size":42,"cas_id":"cas-1"},{"account_handle":"acme","project_handle":"ios",'
                    b'"action":"download","size":7,"cas_id":"cas-2"}]}')
    assert headers["content-type"] == "application/json"
    assert headers["x-cache-signature"] == hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-cache-endpoint"] == "cache-eu-1.example.com:7443"
    analytics.stop()  # flushes the gradle batch of one
    receiver.wait_for(2)
    path, _, body = receiver.requests[1]
    assert path == "/webhooks/gradle-cache"
    assert json.loads(body) == {"events": [{"account_handle": "acme", "project_handle": "android",
                                            "action": "download", "size": 64, "cache_key": "gradle-key"}]}


def test_only_namespace_scoped_cas_and_gradle_are_reported() -> None:
    assert event_for("xcode", "t", "", "blob/x", "upload", 1) is None  # tenant-wide
    assert event_for("xcode", "t", "p", "action_cache/x", "upload", 1) is None  # keyvalue
    assert event_for("nx", "t", "p", "h", "upload", 1) is None
    assert event_for("gradle", "t", "p", "k", "download", 3).key == "k"


def test_batches_also_leave_on_the_timeout(receiver: Receiver) -> None:
    analytics = analytics_for(receiver, analytics_batch_size=100, analytics_batch_timeout_ms=300)
    started = time.monotonic()
    analytics.record("gradle", "acme", "android", "k1", "upload", 1)
    receiver.wait_for(1, timeout=5)
    assert 0.2 <= time.monotonic() - started < 3
    analytics.stop()


def test_a_hanging_receiver_never_slows_recording_and_a_full_queue_drops(receiver: Receiver) -> None:
    receiver.hang_s = 3.0
    analytics = analytics_for(receiver, analytics_batch_size=1, analytics_queue_capacity=5,
                              analytics_request_timeout_ms=5000)
    dropped_before = dropped()
    analytics.record("gradle", "acme", "a", "first", "upload", 1)
    time.sleep(0.2)  # the sender is now stuck in the hanging request
    started = time.perf_counter()
    for i in range(50):
        analytics.record("gradle", "acme", "a", f"k{i}", "upload", 1)
    assert time.perf_counter() - started < 0.05  # recording never waits for the receiver
    assert dropped() - dropped_before >= 44  # 5 fit in the queue
    receiver.hang_s = 0.0
    analytics.stop(timeout_s=10)


def test_the_breaker_opens_after_failures_and_recovers(receiver: Receiver) -> None:
    receiver.status = 500
    analytics = analytics_for(receiver, analytics_batch_size=1,
                              analytics_circuit_breaker_failure_threshold=2,
                              analytics_circuit_breaker_open_ms=500)
    for i in range(2):
        analytics.record("gradle", "acme", "a", f"fail-{i}", "upload", 1)
        receiver.wait_for(i + 1)
    time.sleep(0.1)
    analytics.record("gradle", "acme", "a", "while-open", "upload", 1)
    time.sleep(0.3)
    assert len(receiver.requests) == 2  # open: the batch was dropped, not sent
    receiver.status = 200
    time.sleep(0.3)  # past the open window: half open lets one batch through, which closes it
    analytics.record("gradle", "acme", "a", "probe", "upload", 1)
    receiver.wait_for(3)
    analytics.record("gradle", "acme", "a", "after", "upload", 1)
    receiver.wait_for(4)
    assert [json.loads(b)["events"][0]["cache_key"] for _, _, b in receiver.requests] == \
        ["fail-0", "fail-1", "probe", "after"]
    analytics.stop()


def test_a_real_node_reports_namespace_scoped_cas_and_gradle_traffic(receiver: Receiver,
                                                                      node_factory) -> None:  # type: ignore[no-untyped-def]
    import requests

    node = node_factory("node", KURA_ANALYTICS_SERVER_URL=receiver.url, KURA_ANALYTICS_SIGNING_KEY=KEY,
                        KURA_ANALYTICS_BATCH_TIMEOUT_MS="200", KURA_HTTP_WORKERS="1")
    q = "?tenant_id=acme&namespace_id=ios"
    blob = b"x" * 100_000
    assert requests.post(node.url + "/api/cache/cas/cas-1" + q, data=blob, timeout=10).status_code == 204
    assert requests.get(node.url + "/api/cache/cas/cas-1" + q, timeout=10).content == blob  # fast path
    assert requests.put(node.url + "/api/cache/gradle/gk" + q.replace("ios", "android"), data=b"g",
                        timeout=10).status_code == 201
    assert requests.get(node.url + "/api/cache/gradle/gk" + q.replace("ios", "android"),
                        timeout=10).content == b"g"
    assert requests.get(node.url + "/api/cache/cas/cas-1?tenant_id=acme", timeout=10).status_code == 404
    requests.put(node.url + "/v1/cache/nx-hash", data=b"n", timeout=10)  # not reported
    deadline = time.monotonic() + 10
    events: dict[str, list[dict]] = {}
    while time.monotonic() < deadline and sum(len(v) for v in events.values()) < 4:
        time.sleep(0.1)
        events = {}
        for path, headers, body in list(receiver.requests):
            assert headers["x-cache-signature"] == hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
            events.setdefault(path, []).extend(json.loads(body)["events"])
    assert sorted((e["action"], e["size"]) for e in events["/webhooks/cache"]) == \
        [("download", 100_000), ("upload", 100_000)]
    assert all(e["account_handle"] == "acme" and e["project_handle"] == "ios" and e["cas_id"] == "cas-1"
               for e in events["/webhooks/cache"])
    assert sorted(e["action"] for e in events["/webhooks/gradle-cache"]) == ["download", "upload"]
    # KURA_NODE_URL defaults to http://<hostname>:<internal port>.
    assert receiver.requests[0][1]["x-cache-endpoint"] == \
        f"{socket.gethostname()}:{node.env['KURA_INTERNAL_PORT']}"
    # A receiver that hangs never slows a cache request.
    receiver.hang_s = 5.0
    started = time.monotonic()
    for i in range(20):
        requests.put(node.url + f"/api/cache/gradle/k{i}" + q, data=b"v", timeout=10)
    assert time.monotonic() - started < 3.0
