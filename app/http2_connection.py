"""kura-py's HTTP/2 server connection: gunicorn 27's (``HTTP2ServerConnection``, on the
``h2`` state machine) with two corrections, used by ``app.http_worker``.

1. A request head gunicorn's parser refuses (an over-long ``:path``, a header value with
   control characters) is answered with the JSON error shape and the status HTTP/1.1 gets
   for it (414, 431, 400) before the stream is reset, instead of a bare
   ``RST_STREAM(PROTOCOL_ERROR)``: RFC 9113 8.1.1 lets a server answer a malformed request
   first, and every kura-py error is ``{"message": ...}``.
2. The settings the connection advertises are the configured ones
   (:meth:`KuraHTTP2Connection.initiate_connection`).

And one addition: small whole answers are held and leave together
(:meth:`KuraHTTP2Connection.send_small_response`). gunicorn writes every frame to the socket
as soon as h2 has encoded it, so a download took two writes (HEADERS, DATA); a client with 64
streams in flight gets the answers to a batch of requests in one write instead.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine, ParseException
from gunicorn.http2.connection import HTTP2ServerConnection
from gunicorn.http2.request import HTTP2Request
from gunicorn.http2.stream import HTTP2Stream
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

# HTTP/1.1 answers these below Flask with the same statuses (gunicorn's error mapping).
_REFUSAL_STATUS = ((LimitRequestLine, 414), (LimitRequestHeaders, 431))


def error_body(message: str) -> bytes:
    """The one JSON error shape, as bytes (below Flask, where ``app.http.errors`` is not)."""
    return json.dumps({"message": message}).encode()


def send_json_error(h2_conn: HTTP2ServerConnection, stream_id: int, status: int, message: str,
                    headers: Mapping[str, str] | None = None) -> None:
    """Answer one HTTP/2 stream with the JSON error shape."""
    body = error_body(message)
    fields = [("content-type", "application/json"), ("content-length", str(len(body))),
              *((name.lower(), value) for name, value in (headers or {}).items())]
    h2_conn.send_response(stream_id, status, fields, body)


class KuraHTTP2Connection(HTTP2ServerConnection):
    _holding = False  # frames h2 encodes now stay in its buffer
    _held = False  # h2's buffer has frames that were held

    def send_small_response(self, stream_id: int, status: int, headers: list[tuple[str, str]],
                            body: bytes) -> bool:
        """Answer a stream with ``body`` whole, held back from the socket when the body fits
        the peer's flow-control window and one frame: held frames leave with the
        connection's next write, at the latest before it next reads from the peer (so a batch
        of streams is answered in one write, and nothing held ever waits on the peer).
        False when the peer reset the stream."""
        try:
            room = min(self.h2_conn.local_flow_control_window(stream_id),
                       self.h2_conn.max_outbound_frame_size)
        except H2Error:
            room = -1  # the stream is gone: gunicorn's sends below find that out
        self._holding = len(body) <= room
        try:
            if not self.send_response_headers(stream_id, status, headers, end_stream=not body):
                return False
            return not body or self.send_data(stream_id, body, end_stream=True)
        finally:
            if self._holding:
                self._holding = False
                self._held = True

    def cleanup_stream(self, stream_id: int) -> None:
        if not self._held or self.draining:
            super().cleanup_stream(stream_id)
            return
        self._holding = True  # gunicorn writes after every stream; held frames wait for the batch
        try:
            super().cleanup_stream(stream_id)
        finally:
            self._holding = False

    def _send_pending_data(self) -> None:
        if self._holding:
            return
        self._held = False
        super()._send_pending_data()

    def _read_and_process(self, data: bytes | None, waiting_stream_id: int | None = None) -> Any:
        if self._held:
            self._send_pending_data()  # the peer may be waiting for what was held
        return super()._read_and_process(data, waiting_stream_id)

    def initiate_connection(self) -> None:
        """gunicorn queues a SETTINGS frame with its configured values and then lets h2 send
        the preface SETTINGS from h2's defaults (MAX_CONCURRENT_STREAMS 100): the last frame
        wins, so clients were told 100 streams, not ``http2_max_concurrent_streams``. With
        h2's defaults replaced first, both frames say the same."""
        self._configure_local_settings()
        super().initiate_connection()

    def initiate_upgrade(self, settings_header: bytes, http1_req: Any, body: bytes | None = None) -> Any:
        self._configure_local_settings()
        return super().initiate_upgrade(settings_header, http1_req, body)

    def _configure_local_settings(self) -> None:
        cfg = self.cfg
        values = {SettingCodes.MAX_CONCURRENT_STREAMS: cfg.http2_max_concurrent_streams,
                  SettingCodes.INITIAL_WINDOW_SIZE: cfg.http2_initial_window_size,
                  SettingCodes.MAX_FRAME_SIZE: cfg.http2_max_frame_size,
                  SettingCodes.MAX_HEADER_LIST_SIZE: (cfg.http2_max_header_list_size
                                                      or self.h2_conn.DEFAULT_MAX_HEADER_LIST_SIZE)}
        self.h2_conn.local_settings = Settings(client=False, initial_values=values)

    def _handle_request_received(self, event: Any) -> HTTP2Request | None:
        # gunicorn 27's method, except for the answer to a refused request head.
        stream_id = event.stream_id
        if self.draining and stream_id > self.peer_last_stream_id:
            # Opened after the peer's GOAWAY: it said it would not process it.
            self._reset_quietly(stream_id, 0x7)  # REFUSED_STREAM
            return None
        stream = HTTP2Stream(stream_id, self)
        self.streams[stream_id] = stream
        stream.receive_headers(event.headers, end_stream=False)
        try:
            return HTTP2Request(stream, self.cfg, self.client_addr)
        except (ParseException, ValueError) as exc:
            status = next((code for kind, code in _REFUSAL_STATUS if isinstance(exc, kind)), 400)
            send_json_error(self, stream_id, status, str(exc) or "Bad Request")
            # Answered; a body still on its way is cut off with RST_STREAM(NO_ERROR).
            self.cleanup_stream(stream_id)
            return None
