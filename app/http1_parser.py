"""The HTTP worker's HTTP/1 request parser: gunicorn's, with a light path for plain reads.

gunicorn's ``Request`` costs about 100 µs of Python per request head on these machines
(config lookups, the forwarded-headers policy, the body reader), more than everything else
an artifact hit does. Most requests a cache sees are small GETs with a handful of ordinary
headers, so :class:`KuraRequestParser` first reads such a head itself into a
:class:`LightRequest`, which the download fast path (``app.http.fast_reads``) answers. Any
request the fast path declines is parsed again from the same bytes by gunicorn's own
``Request`` (:meth:`KuraRequestParser.full_request`), so every rule, error and environ
keeps gunicorn's single definition.

The light path is strictly narrower than gunicorn: it takes a head only when gunicorn would
accept it and read the same method, path, query, version and headers from it (the
differential test in ``tests/http/test_fast_reads.py`` checks this on generated heads).
Everything else goes to gunicorn untouched: another method or version, an incomplete head
in the first read, a body (``Content-Length``, ``Transfer-Encoding``), ``Expect``,
``Upgrade`` (h2c), a name with ``_`` (gunicorn drops those), a repeated singleton field,
more than one scheme header, anything outside printable ASCII, a fragment or a ``//``
target, limits reached, PROXY protocol.
"""
from __future__ import annotations

import re
from typing import Any

from gunicorn.http.body import Body, LengthReader
from gunicorn.http.message import RFC9110_5_3_SINGLETON_FIELDS, Request
from gunicorn.http.parser import RequestParser

_METHODS = {b"GET": "GET", b"HEAD": "HEAD"}
_VERSIONS = {b"HTTP/1.1": (1, 1), b"HTTP/1.0": (1, 0)}
# An origin-form target of printable ASCII without a fragment, not starting with "//".
_TARGET = re.compile(rb"/(?:[\x21\x22\x24-\x2e\x30-\x7e][\x21\x22\x24-\x7e]*)?")
# An RFC 9110 token without "_" (gunicorn drops or refuses such names).
_NAME = re.compile(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+")
# A field value the light path takes: printable ASCII, spaces and tabs.
_VALUE_OUTSIDE = re.compile(rb"[^\x20-\x7e\t]")
# Fields that give the request a body, an expectation or another protocol.
_NOT_LIGHT = frozenset({"CONTENT-LENGTH", "TRANSFER-ENCODING", "EXPECT", "UPGRADE",
                        "HTTP2-SETTINGS"})


class LightRequest(Request):
    """A GET/HEAD head read by :class:`KuraRequestParser`: the attributes of gunicorn's
    ``Request`` that the worker and the fast path read (``should_close``, ``force_close``
    and the empty body are gunicorn's own), set without gunicorn's parsing."""

    def __init__(self, parser: KuraRequestParser, raw_head: bytes, method: str, uri: str,
                 version: tuple[int, int], headers: list[tuple[str, str]]) -> None:
        # gunicorn's Request.__init__ parses; everything it would set is set here instead.
        self.parser = parser
        self.raw_head = raw_head
        self.cfg = parser.cfg
        self.unreader = parser.unreader
        self.peer_addr = self.remote_addr = parser.source_addr
        self.method = method
        self.uri = uri
        self.path, _, self.query = uri.partition("?")
        self.fragment = ""
        self.version = version
        self.headers = headers
        self.trailers = []
        self.scheme = parser.scheme
        self.must_close = False
        self._expected_100_continue = False
        self.req_number = parser.req_count
        self.proxy_protocol_info = None
        self.body = Body(LengthReader(parser.unreader, 0))


class KuraRequestParser(RequestParser):
    """gunicorn's ``RequestParser`` that yields a :class:`LightRequest` for a plain
    GET/HEAD head and gunicorn's ``Request`` for everything else."""

    def __init__(self, cfg: Any, source: Any, source_addr: Any) -> None:
        super().__init__(cfg, source, source_addr)
        self.scheme = "https" if cfg.is_ssl else "http"
        self._light = cfg.proxy_protocol == "off"
        self._line_limit = cfg.limit_request_line if cfg.limit_request_line > 0 else 8190
        self._fields_limit = cfg.limit_request_fields if cfg.limit_request_fields > 0 else 100
        self._field_size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else 8190
        self._scheme_headers = frozenset(cfg.secure_scheme_headers)

    def __next__(self) -> Any:
        if self.mesg and self.mesg.should_close():
            raise StopIteration()
        if not self.finish_body():
            raise StopIteration()
        self.req_count += 1
        if self._light:
            data = self.unreader.read()
            if not data:
                raise StopIteration()  # the client closed between requests (gunicorn's stop)
            light = self._light_request(data)
            if light is not None:
                self.mesg = light
                return light
            self.unreader.unread(data)
        self.mesg = Request(self.cfg, self.unreader, self.source_addr, self.req_count)
        return self.mesg

    next = __next__

    def full_request(self, light: LightRequest) -> Request:
        """gunicorn's ``Request`` for the head ``light`` was read from (what follows it stays
        buffered behind it): for a request the fast path does not answer."""
        self.unreader.unread(light.raw_head)
        self.mesg = Request(self.cfg, self.unreader, self.source_addr, light.req_number)
        return self.mesg

    def _light_request(self, data: bytes) -> LightRequest | None:
        end = data.find(b"\r\n\r\n")
        if end <= 0:
            return None
        lines = data[:end].split(b"\r\n")
        if len(lines) > self._fields_limit or b"\n" in data[:end + 2].replace(b"\r\n", b""):
            return None
        parts = lines[0].split(b" ")
        if len(parts) != 3 or len(lines[0]) >= self._line_limit:
            return None
        method = _METHODS.get(parts[0])
        version = _VERSIONS.get(parts[2])
        if method is None or version is None or not _TARGET.fullmatch(parts[1]):
            return None
        headers = []
        seen: set[str] = set()
        schemes = 0
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if (not colon or len(line) + 2 > self._field_size or not _NAME.fullmatch(name)
                    or b"\r" in line or _VALUE_OUTSIDE.search(value)):
                return None
            upper = name.decode("ascii").upper()
            if upper in _NOT_LIGHT:
                return None
            if upper in RFC9110_5_3_SINGLETON_FIELDS:
                if upper in seen:
                    return None
                seen.add(upper)
            if upper in self._scheme_headers:
                schemes += 1
                if schemes > 1:
                    return None
            headers.append((upper, value.strip(b" \t").decode("ascii")))
        if end + 4 < len(data):
            self.unreader.unread(data[end + 4:])
        return LightRequest(self, data[:end + 4], method, parts[1].decode("ascii"), version, headers)
