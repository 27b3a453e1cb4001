"""Raw HTTP/1.1 over a socket, for requests no HTTP client library would send."""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    """One HTTP response read off a socket."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Exchange:
    """Every response a connection carried until the server closed it (or ``timeout``)."""

    answers: list[Answer] = field(default_factory=list)
    closed: bool = False  # the server closed the connection (EOF or reset)
    leftover: bytes = b""  # bytes that did not parse as a response


def parse_answers(data: bytes, to_head: bool = False) -> tuple[list[Answer], bytes]:
    """Split ``data`` into complete responses (framed by Content-Length; ``to_head``: answers
    to HEAD, which have none) and what is left."""
    answers = []
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        _version, status, reason = (status_line.split(" ", 2) + [""])[:3]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if to_head else int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        answers.append(Answer(int(status), reason, headers, rest[:length]))
        data = rest[length:]
    return answers, data


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything ``sock`` receives until the peer closes it or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> Exchange:
    """Send ``raw`` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data, closed = read_until_closed(sock, timeout)
    answers, leftover = parse_answers(data, to_head=raw.startswith(b"HEAD "))
    return Exchange(answers, closed, leftover)


def read_answer(sock: socket.socket, timeout: float = 5.0) -> Answer:
    """The next complete response on a keep-alive connection."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        answers, _ = parse_answers(data)
        if answers:
            return answers[0]
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response: {data!r}")
        data += chunk
