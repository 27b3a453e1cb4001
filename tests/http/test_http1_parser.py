"""The light HTTP/1 head parser reads exactly what gunicorn reads, or leaves the head to it.

Generated heads (odd methods, targets, versions, line endings, header names and values,
bodies, upgrades, pipelined requests) are parsed by ``KuraRequestParser`` and by
gunicorn's ``RequestParser`` from the same bytes over socketpairs. Whatever the light
path takes, gunicorn must accept with the same method, path, query, version, headers,
``should_close`` and the same bytes left for the next request; whatever it declines is
gunicorn's own outcome (the same request or the same error).
"""
from __future__ import annotations

import socket
from collections import Counter
from typing import Any

from gunicorn.config import Config
from gunicorn.http.errors import ParseException
from gunicorn.http.parser import RequestParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.http1_parser import KuraRequestParser, LightRequest

CFG = Config()
MAX_EXAMPLES = 3000

METHODS = ["GET", "GET", "GET", "HEAD", "get", "POST", "PUT", "OPTIONS", "CONNECT", "GE T"]
TARGETS = ["/v1/cache/abc", "/v1/cache/abc?tenant_id=acme&namespace_id=p", "/api/cache/cas/c1?x",
           "/a#frag", "/a?b#c", "//x/y", "/", "/?", "/a?b?c", "*", "http://h/x", "h:80", "",
           "/caf\xe9", "/a\tb", "/%41%2F", "/a" + "x" * 9000, "/a;b=c", "/~user/+x!$&'()*,=:@"]
VERSIONS = ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.10", "HTTP/1",
            "HTTP/0.9"]
HEADERS = [("Host", "kura"), ("host", "other"), ("User-Agent", "wrk/4.2"), ("Accept", "*/*"),
           ("X_Foo", "1"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Ssl", "on"),
           ("X-Forwarded-For", "10.0.0.1"), ("Content-Length", "0"), ("Content-Length", "5"),
           ("content-length", "x"), ("Transfer-Encoding", "chunked"), ("Expect", "100-continue"),
           ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
           ("Connection", "Upgrade, HTTP2-Settings"), ("Connection", "close"),
           ("Connection", "keep-alive"), ("Range", "bytes=0-1"), ("If-Range", '"x"'),
           ("Content-Type", "a/b"), ("Name ", "v"), (" Folded", "v"), ("\tTab", "v"),
           ("Val", "a\x01b"), ("Val", "caf\xe9"), ("Val", "\ta\tb \t"), ("Empty", ""),
           (":", "x"), ("", "x"), ("X-Long", "y" * 9000), ("Na(me", "v"), ("Na\xefme", "v"),
           ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
           ("Authorization", "Bearer a.b.c"), ("X-Del", "a\x7fb"), ("Cr", "a\rb")]
TRAILING = [b"", b"", b"GET /next HTTP/1.1\r\nHost: k\r\n\r\n", b"HEAD /n2?q HTTP/1.0\r\n\r\n",
            b"hello", b"PRI * HTTP/2.0\r\n\r\n"]


def mostly(likely: Any, odd: list[Any]) -> st.SearchStrategy[Any]:
    """``likely`` nine times in ten, else one of ``odd``."""
    return st.sampled_from([likely] * 9 * len(odd) + odd)


PLAIN_HEADERS = [h for h in HEADERS if h[0] in ("Host", "User-Agent", "Accept", "Range", "If-Range",
                                                "traceparent", "Authorization", "X-Forwarded-For",
                                                "X-Forwarded-Proto", "Connection", "Empty", "Val")
                 and h[1].isascii() and h[1].isprintable()]


@st.composite
def head(draw: Any) -> bytes:
    sep = draw(mostly(" ", ["  ", "\t"]))
    line = sep.join((draw(mostly("GET", METHODS)), draw(mostly(draw(st.sampled_from(TARGETS[:3])), TARGETS)),
                     draw(mostly("HTTP/1.1", VERSIONS))))
    ends = mostly("\r\n", ["\n", "\r", "\r\r\n"])
    pool = draw(st.sampled_from([PLAIN_HEADERS, PLAIN_HEADERS, HEADERS]))
    fields = "".join(f"{name}:{draw(mostly(' ', ['', '  ', chr(9)]))}{value}{draw(ends)}"
                     for name, value in draw(st.lists(st.sampled_from(pool), max_size=7)))
    lead = draw(mostly("", ["\r\n", "\r\n\r\n", "\n"]))
    text = f"{lead}{line}{draw(ends)}{fields}\r\n"
    return text.encode("latin-1") + draw(st.sampled_from(TRAILING))


def outcome(parser_class: type, raw: bytes) -> tuple[Any, ...]:
    """What ``parser_class`` reads from ``raw``: each request's fields (two at most) and the
    bytes left behind, or the exception that ended parsing."""
    server, client = socket.socketpair()
    try:
        client.sendall(raw)
        client.shutdown(socket.SHUT_WR)
        parser = parser_class(CFG, server, ("127.0.0.1", 1))
        seen: list[Any] = []
        for _ in range(2):
            try:
                req = next(parser)
            except StopIteration:
                seen.append("stop")
                break
            except (ParseException, OSError) as exc:  # gunicorn's refusals, NoMoreData
                seen.append(type(exc).__name__)
                break
            seen.append((isinstance(req, LightRequest), req.method, req.path, req.query,
                         req.fragment, req.version, req.headers, req.should_close()))
            if req.should_close():
                break
        left = parser.unreader.take_buffered()
        server.settimeout(1)
        while chunk := server.recv(65536):
            left += chunk
        return (*seen, left)
    finally:
        server.close()
        client.close()


def test_light_heads_read_exactly_what_gunicorn_reads() -> None:
    stats: Counter[str] = Counter()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(head())
    def agree(raw: bytes) -> None:
        light = outcome(KuraRequestParser, raw)
        full = outcome(RequestParser, raw)
        strip = [item[1:] if isinstance(item, tuple) else item for item in light]
        assert strip == [item[1:] if isinstance(item, tuple) else item for item in full], raw
        taken = sum(1 for item in light[:-1] if isinstance(item, tuple) and item[0])
        stats["light"] += taken
        stats["gunicorn"] += sum(1 for item in light[:-1] if isinstance(item, tuple) and not item[0])
        stats["refused"] += sum(1 for item in light[:-1] if isinstance(item, str) and item != "stop")

    agree()
    print(dict(stats))
    # The generator reaches both paths and gunicorn's refusals.
    assert stats["light"] >= MAX_EXAMPLES // 10
    assert stats["gunicorn"] >= MAX_EXAMPLES // 20
    assert stats["refused"] >= MAX_EXAMPLES // 5


def test_a_declined_head_is_parsed_again_by_gunicorn_with_what_follows_it() -> None:
    """``full_request``: the fast path did not answer; gunicorn's ``Request`` is made from the
    same head and the pipelined request behind it is still next."""
    server, client = socket.socketpair()
    try:
        client.sendall(b"GET /missing?x=1 HTTP/1.1\r\nHost: k\r\nRange: bytes=0-1\r\n\r\n"
                       b"HEAD /next HTTP/1.0\r\n\r\n")
        parser = KuraRequestParser(CFG, server, ("127.0.0.1", 1))
        light = next(parser)
        assert isinstance(light, LightRequest)
        full = parser.full_request(light)
        assert not isinstance(full, LightRequest)
        assert (full.method, full.path, full.query, full.headers) == (
            "GET", "/missing", "x=1", [("HOST", "k"), ("RANGE", "bytes=0-1")])
        following = next(parser)
        assert (following.method, following.path, following.version) == ("HEAD", "/next", (1, 0))
        assert following.should_close()
    finally:
        server.close()
        client.close()


def test_limits_leave_the_head_to_gunicorn() -> None:
    many = "".join(f"X-{n}: v\r\n" for n in range(CFG.limit_request_fields + 1))
    for raw in (f"GET /a HTTP/1.1\r\n{many}\r\n".encode(),
                f"GET /{'a' * CFG.limit_request_line} HTTP/1.1\r\n\r\n".encode(),
                f"GET /a HTTP/1.1\r\nX: {'v' * CFG.limit_request_field_size}\r\n\r\n".encode()):
        light = outcome(KuraRequestParser, raw)
        assert light == outcome(RequestParser, raw)
        assert isinstance(light[0], str), light[0]  # gunicorn refuses each of them
