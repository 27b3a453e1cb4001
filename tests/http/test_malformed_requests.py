"""Malformed HTTP/1.1 on a real node, over raw sockets: every one is answered once, with a
4xx JSON ``{"message"}`` (501 only for a Transfer-Encoding the server does not implement),
and the connection is closed."""
from __future__ import annotations

from tests.http.raw_http import exchange

T = "tenant_id=acme"
H = "Host: kura\r\n"
CHUNKED = f"{H}Transfer-Encoding: chunked\r\n\r\n"
KV = f"PUT /api/cache/keyvalue?{T} HTTP/1.1\r\n"
METRO = "PUT /api/metro/cache/k HTTP/1.1\r\n"

CASES: dict[str, tuple[str, list[int]]] = {
    # chunked framing, read by a view
    "bad chunk size, upload": (f"{METRO}{CHUNKED}zz\r\nab\r\n0\r\n\r\n", [400]),
    "bad chunk size, document": (f"{KV}{CHUNKED}zz\r\nab\r\n0\r\n\r\n", [400]),
    "bad chunk extension, document": (f"{KV}{CHUNKED}2;\x01\r\nab\r\n0\r\n\r\n", [400]),
    "missing chunk terminator, document": (f"{KV}{CHUNKED}2\r\nabXX0\r\n\r\n", [400]),
    "malformed trailer, document": (f"{KV}{CHUNKED}2\r\nab\r\n0\r\nbad trailer\r\n\r\n", [400]),
    "forbidden trailer, upload": (f"{METRO}{CHUNKED}2\r\nab\r\n0\r\nContent-Length: 5\r\n\r\n", [400]),
    # chunked framing of a body nobody read: the request was answered, nothing more is
    "bad chunk after an answered probe": (f"GET /up HTTP/1.1\r\n{CHUNKED}zz\r\n\r\n", [200]),
    "bad chunk after an answered 404": (
        f"POST /api/cache/module/complete?{T}&upload_id=nope HTTP/1.1\r\n{CHUNKED}zz\r\n\r\n", [404]),
    # framing headers
    "Content-Length and Transfer-Encoding": (
        f"{METRO}{H}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400]),
    "two Content-Length": (f"{METRO}{H}Content-Length: 1\r\nContent-Length: 1\r\n\r\na", [400]),
    "Content-Length list": (f"{METRO}{H}Content-Length: 1, 1\r\n\r\na", [400]),
    "negative Content-Length": (f"{METRO}{H}Content-Length: -1\r\n\r\n", [400]),
    "superscript Content-Length": (f"{METRO}{H}Content-Length: \u00b2\r\n\r\nab", [400]),
    "huge Content-Length": (f"{METRO}{H}Content-Length: {'9' * 5000}\r\n\r\n", [400]),
    "Transfer-Encoding without chunked": (f"{METRO}{H}Transfer-Encoding: gzip\r\n\r\n", [400]),
    "chunked twice": (f"{METRO}{H}Transfer-Encoding: chunked, chunked\r\n\r\n", [400]),
    "chunked in HTTP/1.0": (f"PUT /api/metro/cache/k HTTP/1.0\r\n{CHUNKED}0\r\n\r\n", [400]),
    "unknown Transfer-Encoding": (f"{METRO}{H}Transfer-Encoding: foo\r\n\r\n", [501]),
    # header fields
    "header name with a space": (f"GET /up HTTP/1.1\r\n{H}Bad Header: x\r\n\r\n", [400]),
    "header line without a colon": (f"GET /up HTTP/1.1\r\n{H}NoColon\r\n\r\n", [400]),
    "empty header name": (f"GET /up HTTP/1.1\r\n{H}: x\r\n\r\n", [400]),
    "NUL in a header value": (f"GET /up HTTP/1.1\r\n{H}X-A: a\x00b\r\n\r\n", [400]),
    "obsolete line folding": (f"GET /up HTTP/1.1\r\n{H}X-A: a\r\n b\r\n\r\n", [400]),
    "bare LF in the head": (f"GET /up HTTP/1.1\r\n{H}X-A: b\n\r\n", [400]),
    "over-long header line": (f"GET /up HTTP/1.1\r\n{H}X-A: {'a' * 9000}\r\n\r\n", [431]),
    "too many header lines": (
        f"GET /up HTTP/1.1\r\n{H}" + "".join(f"X-{i}: a\r\n" for i in range(200)) + "\r\n", [431]),
    "two Host headers": (f"GET /up HTTP/1.1\r\n{H}{H}\r\n", [400]),
    "unknown expectation": (f"{METRO}{H}Expect: 200-ok\r\nContent-Length: 1\r\n\r\na", [417]),
    "SCRIPT_NAME the path does not start with": (f"GET /up HTTP/1.1\r\n{H}SCRIPT_NAME: /zz\r\n\r\n", [400]),
    # request line
    "HTTP/2.0 request line": (f"GET /up HTTP/2.0\r\n{H}\r\n", [400]),
    "HTTP/1.x": (f"GET /up HTTP/1.x\r\n{H}\r\n", [400]),
    "no HTTP version": (f"GET /up\r\n{H}\r\n", [400]),
    "lower-case method": (f"get /up HTTP/1.1\r\n{H}\r\n", [400]),
    "garbage": ("GARBAGE\r\n\r\n", [400]),
    "a TLS ClientHello": ("\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", [400]),
    # (the whole HTTP/2 preface is h2c by prior knowledge: tests/http/test_http2.py)
    "HTTP/2 preface that goes wrong": ("PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", [400]),
    "non-ASCII byte in the target": (f"GET /up\xe9 HTTP/1.1\r\n{H}\r\n", [400]),
    "authority form without CONNECT": (f"GET kura:80 HTTP/1.1\r\n{H}\r\n", [400]),
    "over-long request line": (f"GET /{'a' * 9000} HTTP/1.1\r\n{H}\r\n", [414]),
}


def test_malformed_requests_get_one_4xx_json_answer(node_factory) -> None:
    node = node_factory(start=False, KURA_HTTP_WORKERS="1")
    node.start(wait=False)
    node.wait_ready(path="/up")
    got, problems = {}, {}
    for name, (raw, _expected) in CASES.items():
        result = exchange(node.port, raw.encode("latin-1"), timeout=5)
        got[name] = [answer.status for answer in result.answers]
        for answer in result.answers:
            if answer.status >= 400 and (answer.headers.get("content-type") != "application/json"
                                         or not isinstance(answer.json().get("message"), str)):
                problems[name] = answer
        if not result.closed or result.leftover:
            problems[name] = result
    assert got == {name: expected for name, (_raw, expected) in CASES.items()}
    assert problems == {}
    # RFC 9112's answer to a transfer coding the server does not implement, named as such.
    answer = exchange(node.port, CASES["unknown Transfer-Encoding"][0].encode()).answers[0]
    assert (answer.status, answer.reason) == (501, "Not Implemented")
    assert answer.json() == {"message": "Unsupported transfer coding: 'foo'"}

