"""A raw HTTP/2 client over a socket (the ``h2`` state machine), for what HTTP client
libraries hide: the h2c Upgrade, many streams at once, GOAWAY and RST_STREAM frames."""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class H2Answer:
    """What one stream received."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset_code: int | None = None

    def json(self) -> Any:
        return json.loads(bytes(self.body))


class RawH2:
    """One client connection; ``answers`` by stream id, ``goaway`` once the server sent one."""

    def __init__(self, sock: socket.socket, conn: h2.connection.H2Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.answers: dict[int, H2Answer] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False  # EOF from the server
        self.server_settings: dict[int, int] = {}

    @classmethod
    def prior_knowledge(cls, port: int, sock: socket.socket | None = None) -> "RawH2":
        sock = sock or socket.create_connection(("127.0.0.1", port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        return cls(sock, conn)

    @classmethod
    def upgrade(cls, port: int, path: str) -> tuple["RawH2", bytes]:
        """``GET path`` as HTTP/1.1 asking to upgrade to h2c; returns the client (its stream
        1 is that request) and the server's HTTP/1.1 answer head."""
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        settings = conn.initiate_upgrade_connection()  # already base64url
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                     b"HTTP2-Settings: " + settings + b"\r\n\r\n")
        head = b""
        sock.settimeout(30)
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)  # byte by byte: what follows the head is HTTP/2
            if not chunk:
                break
            head += chunk
        client = cls(sock, conn)
        client.answers[1] = H2Answer()
        sock.sendall(conn.data_to_send())
        return client, head

    def request(self, method: str, path: str, body: bytes = b"",
                headers: tuple[tuple[str, str], ...] = ()) -> int:
        """Open a stream; sends what flow control allows of ``body`` (see ``send_body``)."""
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"),
                  (":authority", "127.0.0.1"), *headers]
        if body:
            fields.append(("content-length", str(len(body))))
        self.conn.send_headers(stream_id, fields, end_stream=not body)
        self.answers[stream_id] = H2Answer()
        if body:
            window = self.conn.local_flow_control_window(stream_id)
            first = body[:min(window, self.conn.max_outbound_frame_size)]
            self.conn.send_data(stream_id, first, end_stream=len(first) == len(body))
        self.sock.sendall(self.conn.data_to_send())
        return stream_id

    def read_until(self, done: Callable[["RawH2"], bool], timeout: float = 30) -> None:
        """Read frames (acknowledging data so windows stay open) until ``done`` or EOF."""
        deadline = time.monotonic() + timeout
        while not done(self) and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the server did not answer in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                break
            for event in self.conn.receive_data(data):
                self._on(event)
            outgoing = self.conn.data_to_send()
            if outgoing:
                self.sock.sendall(outgoing)

    def answered(self, *stream_ids: int) -> Callable[["RawH2"], bool]:
        ids = stream_ids or tuple(self.answers)
        return lambda client: all(client.answers[i].ended or client.answers[i].reset_code is not None
                                  for i in ids)

    def _on(self, event: Any) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.server_settings.update({k: v.new_value for k, v in event.changed_settings.items()})
        elif isinstance(event, h2.events.ResponseReceived):
            answer = self.answers[event.stream_id]
            answer.headers = {k.decode(): v.decode() for k, v in event.headers}
            answer.status = int(answer.headers[":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.answers[event.stream_id].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.answers[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.answers[event.stream_id].reset_code = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def close(self) -> None:
        self.sock.close()


MAX_CONCURRENT_STREAMS = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
