"""HTTP/2 on a real node: h2c by Upgrade, many streams on one connection, early answers,
drain (GOAWAY), idle-connection eviction, and h2 / HTTP/1.1 over TLS chosen by ALPN.

The route behaviour itself is covered over both versions by the tests that take the
``web`` fixture (tests/e2e/test_node.py); these cover what only HTTP/2 has.
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import h2.errors
import h2.settings
import httpx
import requests

from app.http_connections import EVICT_AFTER_S
from app.settings import ConfigError, Settings
from bench.proctree import free_ports
from tests.certs import PeerCa
from tests.http.raw_h2 import MAX_CONCURRENT_STREAMS, H2Answer, RawH2
from tests.nodes import REPO, make_node

T = "tenant_id=acme"


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_h2c_upgrade_serves_the_request_then_more_streams(node) -> None:
    body = os.urandom(300_000)
    assert requests.put(f"{node.url}/api/cache/gradle/up?{T}", data=body).status_code == 201
    client, head = RawH2.upgrade(node.port, "/up")
    try:
        assert head.startswith(b"HTTP/1.1 101 ")
        client.read_until(client.answered(1))
        assert client.answers[1].status == 200 and client.answers[1].json()["tenant_id"] == "default"
        second = client.request("GET", f"/api/cache/gradle/up?{T}")
        client.read_until(client.answered(second))
        assert client.answers[second].status == 200 and client.answers[second].body == body
    finally:
        client.close()


def test_128_concurrent_streams_on_one_connection(node) -> None:
    blob = os.urandom(4096)
    assert requests.put(f"{node.url}/api/cache/gradle/s?{T}", data=blob).status_code == 201
    client = RawH2.prior_knowledge(node.port)
    try:
        client.read_until(lambda c: MAX_CONCURRENT_STREAMS in c.server_settings)
        assert client.server_settings[MAX_CONCURRENT_STREAMS] == 128  # Kura's limit
        streams = [client.request("GET", f"/api/cache/gradle/s?{T}") for _ in range(128)]
        client.read_until(client.answered(*streams), timeout=60)
        assert [(client.answers[s].status, bytes(client.answers[s].body)) for s in streams] == \
            [(200, blob)] * 128
        assert client.goaway is None
    finally:
        client.close()


class _CountingSocket:
    """The server side of a socketpair that keeps what each ``sendall`` wrote."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_small_answers_to_a_batch_of_streams_leave_in_one_write() -> None:
    """``KuraHTTP2Connection.send_small_response``: the answers to a batch are held (gunicorn
    wrote HEADERS and DATA of every stream as it went) and leave in ONE write, before the
    connection next reads from the peer."""
    import h2.config
    import h2.connection
    import h2.events
    from gunicorn.config import Config

    from app.http2_connection import KuraHTTP2Connection

    server_sock, client_sock = socket.socketpair()
    try:
        server = _CountingSocket(server_sock)
        conn = KuraHTTP2Connection(Config(), server, ("127.0.0.1", 1))
        conn.initiate_connection()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        for _ in range(8):
            client.send_headers(client.get_next_available_stream_id(),
                                [(":method", "GET"), (":path", "/x"), (":scheme", "http"),
                                 (":authority", "kura")], end_stream=True)
        client_sock.sendall(client.data_to_send())
        batch: list = []
        while len(batch) < 8:
            batch += conn.receive_data()
        held_from = len(server.writes)
        for req in batch:
            stream_id = req.stream.stream_id
            assert conn.send_small_response(stream_id, 200, [("content-length", "5")], b"hello")
            conn.cleanup_stream(stream_id)
        assert len(server.writes) == held_from  # nothing written while the batch is answered
        client.ping(b"12345678")
        client_sock.sendall(client.data_to_send())
        conn.receive_data()  # the next read: what was held leaves first, in one write
        ended = [e.stream_id for e in client.receive_data(server.writes[held_from])
                 if isinstance(e, h2.events.StreamEnded)]
        assert sorted(ended) == sorted(req.stream.stream_id for req in batch)
    finally:
        server_sock.close()
        client_sock.close()


def test_answers_held_for_a_batch_never_wait_on_a_small_window(node) -> None:
    """Small answers to a batch of streams are held and written together
    (``KuraHTTP2Connection.send_small_response``). A client whose windows are smaller than
    the batch gets every byte anyway: an answer that does not fit the window writes what
    was held before it waits for WINDOW_UPDATE, and the connection serves on after."""
    blob = os.urandom(4096)
    assert requests.put(f"{node.url}/api/cache/gradle/w?{T}", data=blob).status_code == 201
    client = RawH2.prior_knowledge(node.port)
    try:
        # Per-stream window 5,000 bytes; the connection's stays 65,535: about 16 answers fit.
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 5000})
        client.sock.sendall(client.conn.data_to_send())
        streams = []
        for _ in range(40):  # one write for all the requests: one batch on the server
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [(":method", "GET"), (":path", f"/api/cache/gradle/w?{T}"),
                                                 (":scheme", "http"), (":authority", "127.0.0.1")],
                                     end_stream=True)
            client.answers[stream_id] = H2Answer()
            streams.append(stream_id)
        client.sock.sendall(client.conn.data_to_send())
        client.read_until(client.answered(*streams), timeout=60)
        assert [(client.answers[s].status, bytes(client.answers[s].body)) for s in streams] == \
            [(200, blob)] * 40
        last = client.request("GET", f"/api/cache/gradle/w?{T}")
        client.read_until(client.answered(last))
        assert bytes(client.answers[last].body) == blob
    finally:
        client.close()


def test_an_early_answer_resets_the_rest_of_the_upload_without_error(node) -> None:
    """413 before the body is read: the answer, then RST_STREAM(NO_ERROR) (RFC 9113 8.1),
    and the connection goes on serving."""
    upload_id = requests.post(f"{node.url}/api/cache/module/start?{T}&hash=h&name=n").json()["upload_id"]
    client = RawH2.prior_knowledge(node.port)
    try:
        big = client.request("POST", f"/api/cache/module/part?{T}&upload_id={upload_id}&part_number=1",
                             body=b"x" * (10 * 1024 * 1024 + 1))
        client.read_until(lambda c: c.answers[big].reset_code is not None)
        assert client.answers[big].status == 413 and client.answers[big].ended
        assert client.answers[big].json() == {"message": "Part exceeds 10MB limit"}
        assert client.answers[big].reset_code == h2.errors.ErrorCodes.NO_ERROR
        up = client.request("GET", "/up")
        client.read_until(client.answered(up))
        assert client.answers[up].status == 200
    finally:
        client.close()


def test_request_heads_the_parser_refuses_get_the_json_error_shape(node) -> None:
    """As over HTTP/1.1 (414, 400 below Flask), not a bare RST_STREAM; the connection goes on."""
    client = RawH2.prior_knowledge(node.port)
    client.conn.config.validate_outbound_headers = False  # send what a hostile client would
    client.conn.config.normalize_outbound_headers = False
    try:
        long_path = client.request("GET", "/up?" + "x" * 9000)
        bad_header = client.request("POST", f"/api/cache/cas/x?{T}", body=b"data",
                                    headers=(("x-h", "a\x01b"),))
        client.read_until(client.answered(long_path, bad_header))
        assert client.answers[long_path].status == 414
        assert client.answers[long_path].json() == {"message": "Request Line is too large (9004 > 8190)"}
        assert client.answers[bad_header].status == 400
        assert client.answers[bad_header].headers["content-type"] == "application/json"
        assert client.answers[bad_header].json() == {"message": "Invalid HTTP Header: 'X-H'"}
        up = client.request("GET", "/up")
        client.read_until(client.answered(up))
        assert client.answers[up].status == 200 and client.goaway is None
    finally:
        client.close()


def test_draining_finishes_streams_in_flight_and_received_then_sends_goaway(node) -> None:
    """An upload in flight when the drain starts completes; a stream that arrived meanwhile
    is answered 503 ``server is draining``; then GOAWAY names it as the last one served.

    (An idle connection may get its GOAWAY as soon as the drain starts, so what this test
    sends after the drain began is written together with the upload's last bytes.)"""
    client = RawH2.prior_knowledge(node.port)
    body = os.urandom(20_000)
    try:
        upload = client.conn.get_next_available_stream_id()
        client.answers[upload] = H2Answer()
        client.conn.send_headers(upload, [(":method", "PUT"), (":path", f"/api/cache/gradle/d?{T}"),
                                          (":scheme", "http"), (":authority", "127.0.0.1"),
                                          ("content-length", str(len(body)))])
        client.conn.send_data(upload, body[:10_000])
        client.sock.sendall(client.conn.data_to_send())
        deadline = time.monotonic() + 20
        while requests.get(node.url + "/status/rollout", timeout=5).json()["http_inflight_requests"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        node.signal(signal.SIGUSR1)  # drain without exiting (preStop)
        while requests.get(node.url + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        late = client.conn.get_next_available_stream_id()
        client.answers[late] = H2Answer()
        client.conn.send_headers(late, [(":method", "GET"), (":path", f"/api/cache/gradle/d?{T}"),
                                        (":scheme", "http"), (":authority", "127.0.0.1")],
                                 end_stream=True)
        client.conn.send_data(upload, body[10_000:], end_stream=True)
        client.sock.sendall(client.conn.data_to_send())
        client.read_until(lambda c: c.goaway is not None)
        assert client.answers[upload].status == 201
        assert client.answers[late].status == 503
        assert client.answers[late].json() == {"message": "server is draining"}
        assert client.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        assert client.goaway.last_stream_id == late
    finally:
        client.close()


def test_idle_h2_connections_make_room_past_the_connection_limit(node_factory) -> None:
    limit = 4
    node = node_factory(start=False, KURA_HTTP_WORKERS="1", KURA_WORKER_CONNECTIONS=str(limit))
    node.start(wait=False)
    node.wait_ready(path="/up")
    idle = [RawH2.prior_knowledge(node.port) for _ in range(limit)]
    try:
        for client in idle:
            stream = client.request("GET", "/up")
            client.read_until(client.answered(stream))
        time.sleep(EVICT_AFTER_S + 0.5)
        started = time.monotonic()
        r = requests.get(f"{node.url}/api/cache/gradle/missing?{T}", timeout=10)
        assert r.status_code == 404 and time.monotonic() - started < 5
        # The connection that waited longest made room: GOAWAY, then the server closed it.
        idle[0].read_until(lambda c: c.closed, timeout=10)
        assert idle[0].goaway is not None and idle[0].goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    finally:
        for client in idle:
            client.close()


def test_a_silent_h2_connection_is_closed_after_the_header_timeout(node_factory) -> None:
    node = node_factory(start=False, KURA_HTTP_WORKERS="1", KURA_HTTP_HEADER_TIMEOUT_MS="2000")
    node.start(wait=False)
    node.wait_ready(path="/up")
    client = RawH2.prior_knowledge(node.port)  # preface and settings, then no request
    try:
        started = time.monotonic()
        client.read_until(lambda c: c.closed, timeout=30)
        assert 1.5 < time.monotonic() - started < 20
        assert client.goaway is not None
    finally:
        client.close()


def tls_node(node_factory, tmp_path, **env: str):  # type: ignore[no-untyped-def]
    """A node with the HTTPS listener; returns it, a client context trusting its
    certificate, and the listener's base URL."""
    ca = PeerCa(tmp_path / "pki")
    issued = ca.issue("public")
    (https_port,) = free_ports(1)
    node = node_factory("tls", KURA_PUBLIC_TLS_CERT_PATH=str(issued.cert),
                        KURA_PUBLIC_TLS_KEY_PATH=str(issued.key), KURA_HTTPS_PORT=str(https_port),
                        **env)
    return node, ssl.create_default_context(cafile=str(ca.path)), f"https://127.0.0.1:{https_port}"


def test_tls_listener_serves_h2_and_http11_by_alpn(node_factory, tmp_path) -> None:
    node, trust, https = tls_node(node_factory, tmp_path)
    blob = os.urandom(1024 * 1024)
    assert requests.put(f"{node.url}/api/cache/gradle/t?{T}", data=blob).status_code == 201
    before = metric(node.url, 'kura_artifact_serving_paths_total{path="read"}')
    with httpx.Client(http2=True, verify=trust, timeout=30) as h2_client:
        r = h2_client.get(f"{https}/api/cache/gradle/t?{T}")
        assert r.http_version == "HTTP/2" and r.status_code == 200 and r.content == blob
        miss = h2_client.get(f"{https}/api/cache/gradle/none?{T}")
        assert miss.status_code == 404 and miss.json() == {"message": "Artifact not found"}
    with httpx.Client(verify=trust, timeout=30) as h1_client:
        # sendfile would bypass TLS: a large hit over TLS is read from the segment.
        r = h1_client.get(f"{https}/api/cache/gradle/t?{T}")
        assert r.http_version == "HTTP/1.1" and r.status_code == 200 and r.content == blob
        put = h1_client.put(f"{https}/api/cache/gradle/t2?{T}", content=b"over tls")
        assert put.status_code == 201
    assert metric(node.url, 'kura_artifact_serving_paths_total{path="read"}') == before + 2
    # The plain port still speaks HTTP/1.1 and h2c.
    assert requests.get(f"{node.url}/api/cache/gradle/t2?{T}").content == b"over tls"
    with httpx.Client(http1=False, http2=True, timeout=30) as h2c:
        assert h2c.get(f"{node.url}/api/cache/gradle/t2?{T}").http_version == "HTTP/2"


def test_a_tls_handshake_that_never_comes_is_dropped_after_the_header_timeout(node_factory,
                                                                              tmp_path) -> None:
    node, trust, https = tls_node(node_factory, tmp_path, KURA_HTTP_HEADER_TIMEOUT_MS="2000")
    port = int(https.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as silent:
        started = time.monotonic()
        with httpx.Client(http2=True, verify=trust, timeout=10) as client:
            assert client.get(f"{https}/up").status_code == 200  # not held up by the silent one
        silent.settimeout(30)
        assert silent.recv(1024) == b""
        assert 1.5 < time.monotonic() - started < 25


def test_public_tls_paths_come_together() -> None:
    for env in ({"KURA_PUBLIC_TLS_CERT_PATH": "/x.crt"}, {"KURA_PUBLIC_TLS_KEY_PATH": "/x.key"}):
        try:
            Settings.from_env(env)
        except ConfigError as exc:
            assert "KURA_PUBLIC_TLS_CERT_PATH and KURA_PUBLIC_TLS_KEY_PATH" in str(exc)
        else:
            raise AssertionError(f"{env} was accepted")
    both = Settings.from_env({"KURA_PUBLIC_TLS_CERT_PATH": "/x.crt", "KURA_PUBLIC_TLS_KEY_PATH": "/x.key"})
    assert both.public_tls and both.https_port == 4443


def test_unusable_public_tls_files_fail_the_start_naming_the_variables(tmp_path) -> None:
    missing = tmp_path / "missing.crt"
    node = make_node(tmp_path, "badtls", KURA_PUBLIC_TLS_CERT_PATH=str(missing),
                     KURA_PUBLIC_TLS_KEY_PATH=str(tmp_path / "missing.key"),
                     KURA_HTTPS_PORT=str(free_ports(1)[0]))
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=REPO,
                          env=node.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "KURA_PUBLIC_TLS_CERT_PATH" in proc.stderr and str(missing) in proc.stderr
