"""Slow clients on a real node: request-head timeout, connection limit and probe reserve.

The node runs one HTTP worker with a small connection limit and a short header timeout so
each scenario takes seconds (``app.http_connections`` has the design).
"""
from __future__ import annotations

import socket
import time

import pytest
import requests

from app.http_connections import EVICT_AFTER_S, RESERVE
from app.settings import ConfigError, Settings
from tests.http.raw_http import parse_answers, read_answer, read_until_closed

LIMIT = 50
HEADER_TIMEOUT_S = 3.0
T = "tenant_id=acme"
PARTIAL_HEAD = b"GET /up HTTP/1.1\r\nHost: x\r\nX-Slow: "


def slow_node(node_factory, header_timeout_s: float = HEADER_TIMEOUT_S):  # type: ignore[no-untyped-def]
    """A node with one HTTP worker, answering (readiness does not matter here)."""
    node = node_factory(start=False, KURA_HTTP_WORKERS="1", KURA_WORKER_CONNECTIONS=str(LIMIT),
                        KURA_HTTP_HEADER_TIMEOUT_MS=str(int(header_timeout_s * 1000)))
    node.start(wait=False)
    node.wait_ready(path="/up")
    return node


def open_slow_heads(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(PARTIAL_HEAD)
        socks.append(sock)
    return socks


def timed_get(url: str) -> tuple[int, float]:
    started = time.monotonic()
    status = requests.get(url, timeout=2).status_code
    return status, time.monotonic() - started


def test_slow_request_heads_neither_hold_the_worker_nor_stay_open(node_factory) -> None:
    node = slow_node(node_factory)
    opened = time.monotonic()
    slow = open_slow_heads(node.port, LIMIT + RESERVE)  # every slot of the worker
    time.sleep(EVICT_AFTER_S + 0.2)
    # Probes keep answering, and so does a cache request: slow heads make room.
    for _ in range(5):
        status, took = timed_get(node.url + "/up")
        assert status == 200 and took < 1.0
        status, took = timed_get(f"{node.url}/api/cache/gradle/missing?{T}")
        assert status == 404 and took < 1.0

    # Every slow head is answered 408 and closed within the header timeout (some sooner:
    # they made room for the requests above).
    for sock in slow:
        data, closed = read_until_closed(sock, opened + HEADER_TIMEOUT_S + 2.0 - time.monotonic())
        answers, _ = parse_answers(data)
        assert closed and [a.status for a in answers] == [408]
        assert answers[0].json() == {"message": "Request header timeout: the request head did not arrive in time"}
        sock.close()


def test_keep_alive_connections_idle_freely_but_heads_are_timed(node_factory) -> None:
    header_timeout_s = 1.5
    node = slow_node(node_factory, header_timeout_s)
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock).status == 200
        # Idle longer than the header timeout: the keep-alive timeout (75 s) bounds that.
        time.sleep(header_timeout_s + 0.5)
        sock.sendall(b"GET /up HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock).status == 200
        # The next head starts but trickles in slower than the header timeout: 408, closed.
        sock.sendall(PARTIAL_HEAD)
        started = time.monotonic()
        data, closed = read_until_closed(sock, header_timeout_s + 2.0)
        assert closed and [a.status for a in parse_answers(data)[0]] == [408]
        assert time.monotonic() - started >= header_timeout_s - 0.2


def test_when_every_connection_is_busy_probes_answer_and_the_rest_get_503(node_factory) -> None:
    node = slow_node(node_factory)
    # Uploads in progress (complete heads, bodies still coming) are busy, not evictable.
    busy = []
    for i in range(LIMIT):
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(f"PUT /api/cache/gradle/busy{i}?{T} HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 8\r\n\r\nhalf".encode())
        busy.append(sock)
    time.sleep(EVICT_AFTER_S + 0.2)

    for _ in range(3):
        status, took = timed_get(node.url + "/up")
        assert status == 200 and took < 1.0
    refused = requests.get(f"{node.url}/api/cache/gradle/busy0?{T}", timeout=2)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.json() == {"message": "Too many connections: every connection of this worker is busy"}

    for sock in busy:
        sock.sendall(b"done")
        assert read_answer(sock).status == 201
        sock.close()
    assert requests.get(f"{node.url}/api/cache/gradle/busy0?{T}", timeout=2).content == b"halfdone"


def test_header_timeout_setting() -> None:
    assert Settings.from_env({}).http_header_timeout_ms == 60_000
    assert Settings.from_env({"KURA_HTTP_HEADER_TIMEOUT_MS": "2500"}).http_header_timeout_ms == 2500
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="KURA_HTTP_HEADER_TIMEOUT_MS"):
            Settings.from_env({"KURA_HTTP_HEADER_TIMEOUT_MS": bad})
