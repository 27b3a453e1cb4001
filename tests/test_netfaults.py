"""FaultyProxy against real loopback servers: exact forwarding, stall/resume, drop, throttle."""
from __future__ import annotations

import hashlib
import http.server
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.netfaults import FaultyProxy

MiB = 1024 * 1024


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo every byte back; answer the client's FIN with a FIN."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy reset us (drop tests)


@pytest.fixture
def echo_server() -> Iterator[socketserver.ThreadingTCPServer]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


BODY = os.urandom(3 * MiB)


class _BlobHandler(http.server.BaseHTTPRequestHandler):
    """GET returns BODY; POST answers the sha256 of what it received."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def do_POST(self) -> None:  # noqa: N802
        remaining = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while remaining:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        reply = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BlobHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _send_all_then_fin(sock: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_forward_round_trips_random_bytes_exactly_on_concurrent_connections(
        echo_server: socketserver.ThreadingTCPServer, faulty_proxy: Callable[..., FaultyProxy]) -> None:
    proxy = faulty_proxy(*echo_server.server_address)
    payloads = [os.urandom(3 * MiB + n) for n in range(3)]
    received: list[bytes] = [b""] * len(payloads)

    def round_trip(i: int) -> None:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sender = _send_all_then_fin(sock, payloads[i])
            received[i] = _read_to_eof(sock)
            sender.join()

    threads = [threading.Thread(target=round_trip, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert received == payloads
    total = sum(map(len, payloads))
    assert (proxy.bytes_to_target, proxy.bytes_to_client, proxy.connections_accepted) == (total, total, 3)
    _wait_for(lambda: proxy.active_connections == 0)


def test_forwards_http(http_server: http.server.ThreadingHTTPServer,
                       faulty_proxy: Callable[..., FaultyProxy]) -> None:
    proxy = faulty_proxy(*http_server.server_address)
    response = requests.get(proxy.url + "/blob", timeout=10)
    assert response.status_code == 200
    assert response.content == BODY


def test_stall_moves_nothing_and_resume_loses_nothing(
        echo_server: socketserver.ThreadingTCPServer, faulty_proxy: Callable[..., FaultyProxy]) -> None:
    proxy = faulty_proxy(*echo_server.server_address)
    first, second = os.urandom(MiB), os.urandom(4 * MiB)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(first)
    assert _recv_exactly(sock, len(first)) == first

    proxy.stall()
    counters = (proxy.bytes_to_target, proxy.bytes_to_client)
    sender = _send_all_then_fin(sock, second)
    late = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    late.sendall(b"late hello")
    late.shutdown(socket.SHUT_WR)
    _wait_for(lambda: proxy.connections_accepted == 2)
    time.sleep(0.5)
    assert (proxy.bytes_to_target, proxy.bytes_to_client) == counters
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    late.settimeout(0.2)
    with pytest.raises(TimeoutError):
        late.recv(1)

    proxy.resume()
    sock.settimeout(10)
    late.settimeout(10)
    assert _read_to_eof(sock) == second
    assert _read_to_eof(late) == b"late hello"
    sender.join(timeout=10)
    total = len(first) + len(second) + len(b"late hello")
    assert (proxy.bytes_to_target, proxy.bytes_to_client) == (total, total)
    sock.close()
    late.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _assert_reset_on_connect(port: int) -> None:
    """A new connection is accepted, then reset (the RST may beat connect() back to the caller)."""
    with pytest.raises(ConnectionResetError):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.recv(1)


def test_drop_resets_open_and_new_connections_until_forward(
        echo_server: socketserver.ThreadingTCPServer, http_server: http.server.ThreadingHTTPServer,
        faulty_proxy: Callable[..., FaultyProxy]) -> None:
    proxy = faulty_proxy(*echo_server.server_address)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(b"ping")
    assert _recv_exactly(sock, 4) == b"ping"

    proxy.drop()
    assert proxy.active_connections == 0
    with pytest.raises(ConnectionResetError):
        sock.recv(1)
    sock.close()

    _assert_reset_on_connect(proxy.port)
    assert proxy.connections_accepted == 2

    http_proxy = faulty_proxy(*http_server.server_address)
    http_proxy.drop()
    with pytest.raises(requests.ConnectionError):
        requests.get(http_proxy.url + "/blob", timeout=5)

    proxy.forward()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as again:
        again.sendall(b"pong")
        assert _recv_exactly(again, 4) == b"pong"


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_throttle_holds_the_rate_with_little_cpu(
        direction: str, http_server: http.server.ThreadingHTTPServer,
        faulty_proxy: Callable[..., FaultyProxy]) -> None:
    rate = MiB
    proxy = faulty_proxy(*http_server.server_address)
    proxy.throttle(rate)
    cpu_before = proxy.cpu_seconds
    started = time.monotonic()
    if direction == "download":
        response = requests.get(proxy.url + "/blob", timeout=30)
        assert response.content == BODY
    else:
        response = requests.post(proxy.url + "/blob", data=BODY, timeout=30)
        assert response.text == hashlib.sha256(BODY).hexdigest()
    elapsed = time.monotonic() - started
    cpu = proxy.cpu_seconds - cpu_before

    measured = len(BODY) / elapsed
    assert 0.75 * rate <= measured <= 1.25 * rate, f"{measured / MiB:.2f} MiB/s over {elapsed:.2f} s"
    assert cpu < 0.05 * elapsed, f"proxy thread used {cpu:.3f} s CPU in {elapsed:.2f} s"


def test_stall_keeps_the_throttle_for_resume(http_server: http.server.ThreadingHTTPServer,
                                             faulty_proxy: Callable[..., FaultyProxy]) -> None:
    proxy = faulty_proxy(*http_server.server_address)
    proxy.throttle(4 * MiB)
    proxy.stall()
    result: dict[str, object] = {}

    def fetch() -> None:
        result["body"] = requests.get(proxy.url + "/blob", timeout=30).content
        result["done"] = time.monotonic()

    thread = threading.Thread(target=fetch)
    thread.start()
    _wait_for(lambda: proxy.connections_accepted == 1)
    time.sleep(0.3)
    assert proxy.bytes_to_target == 0
    resumed = time.monotonic()
    proxy.resume()
    thread.join(timeout=30)
    assert result["body"] == BODY
    elapsed = result["done"] - resumed  # type: ignore[operator]
    assert elapsed >= 0.75 * len(BODY) / (4 * MiB)


def test_unreachable_target_resets_the_client(faulty_proxy: Callable[..., FaultyProxy]) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]  # bound, never listening: connects are refused
        proxy = faulty_proxy("127.0.0.1", closed_port)
        _assert_reset_on_connect(proxy.port)


def test_close_releases_the_port(echo_server: socketserver.ThreadingTCPServer) -> None:
    with FaultyProxy(*echo_server.server_address) as proxy:
        port = proxy.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"x")
            assert _recv_exactly(sock, 1) == b"x"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
