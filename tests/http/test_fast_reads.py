"""The download fast path answers exactly as the blueprint would: a differential test.

Each generated request is parsed by gunicorn's own parser from bytes sent over a
socketpair and handed to the real worker (``KuraGeventWorker.handle_request``, which
offers it to ``FastReads.serve`` first), and, separately, to gunicorn's handler without
the fast path (the blueprint through gunicorn's WSGI environ). Both read the same store;
status, Content-Type, Content-Length and body must be the same.
"""
from __future__ import annotations

import hashlib
import os
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from app.settings import Settings

TENANT = "acme"
BIG = os.urandom(200_000)  # above SMALL_BODY: served with sendfile
BAZEL_BODY = b"bazel-cas"
SHA = hashlib.sha256(BAZEL_BODY).hexdigest()
MAX_EXAMPLES = 3000

# (route, namespace, key, body, content type) stored before the run. Every key exists in
# several namespaces with different bodies, so reading the wrong namespace shows.
STORED = [
    ("/api/cache/cas/{k}", "", "c1", b"cas-root", "x/y"),
    ("/api/cache/cas/{k}", "p", "c1", b"cas-p", "application/octet-stream"),
    ("/api/cache/cas/{k}", "", "a b", b"cas-space", "text/plain"),
    ("/api/cache/gradle/{k}", "", "g1", b"gradle-root", None),
    ("/api/cache/gradle/{k}", "p", "g1", BIG, None),
    ("/api/cache/gradle/{k}", "", "\u00e9", b"gradle-e-acute", None),
    ("/api/cache/gradle/{k}", "_", "g1", b"gradle-underscore", None),
    ("/v1/cache/{k}", "nx", "n1", b"nx-default", None),
    ("/v1/cache/{k}", "p", "n1", b"nx-p", None),
    ("/v1/cache/{k}", "", "n1", b"nx-root", None),
    ("/api/metro/cache/{k}", "metro", "m1", b"metro-default", None),
    ("/api/metro/cache/{k}", "p", "m1", b"metro-p", None),
    ("/api/metro/cache/{k}", "", "m1", b"metro-root", None),
    ("/v8/artifacts/{k}", "turbo", "t1", b"turbo-default", None),
    ("/v8/artifacts/{k}", "p", "t1", BIG, None),
    ("/v8/artifacts/{k}", "acme", "t1", b"turbo-acme", None),
    ("/cas/{k}", "bazel", SHA, BAZEL_BODY, None),
    ("/cas/{k}", "p", SHA, BAZEL_BODY, None),
    ("/ac/{k}", "bazel", SHA, b"ac-default", None),
    ("/ac/{k}", "p", SHA, BIG, None),
]
# Turborepo's upload headers, kept with its artifacts and sent back by both paths.
TURBO_KEPT = {"x-artifact-duration": "321", "x-artifact-tag": "dGFn"}
KEYVALUE = [("", "kv1", "root"), ("p", "kv1", "p")]

KEYS = ["c1", "g1", "n1", "m1", "t1", "kv1", "a b", "\u00e9", "missing", SHA, SHA.upper()]
ODD_SEGMENTS = ["", "%2F", "a%2Fb", "..", "%2E%2E", ".", "%00", "%0A", "%FF", "%C3%28", "%", "%2",
                "%zz", "+", "%2B", "x" * 1025, "_", "%5F", "p%00"]
NAMESPACES = ["", "p", "_", "nx", "metro", "turbo", "acme", "bazel"]
QUERY_NAMES = ["tenant_id", "account_handle", "namespace_id", "project_handle", "slug", "teamId", "x",
               "TENANT_ID"]
QUERY_VALUES = ["", TENANT, "other", "p", "nx", "metro", "_", "%70", "%FF", "a%2Fb", "..", "%00", "p+q",
                "%61cme", "x" * 1025]


def encode(text: str, every: bool, upper: bool) -> str:
    """Percent-encode ``text``: only what must be, or every byte (upper- or lower-case hex)."""
    if not every:
        return quote(text, safe="")
    return "".join(("%%%02X" if upper else "%%%02x") % b for b in text.encode())


ROUTES = {  # shape -> (path, the key stored for it)
    "cas": ("/api/cache/cas/{k}", "c1"), "keyvalue": ("/api/cache/keyvalue/{k}", "kv1"),
    "gradle": ("/api/cache/gradle/{k}", "g1"), "gradle_path": ("/gradle/{t}/{n}/{k}", "g1"),
    "nx": ("/v1/cache/{k}", "n1"), "nx_path": ("/nx/{n}/v1/cache/{k}", "n1"),
    "metro": ("/api/metro/cache/{k}", "m1"), "turbo": ("/v8/artifacts/{k}", "t1"),
    "bazel_ac": ("/ac/{k}", SHA), "bazel_cas_path": ("/{n}/cas/{k}", SHA),
}
RANGES = ["bytes=0-0", "bytes=2-5", "bytes=3-", "bytes=-4", "bytes=-999999", "bytes=150000-",
          "bytes=5-2", "bytes=0-1,4-5", "bytes=-0", "bytes=9999999-", "bytes=100-200000000",
          "items=0-1", "bytes=x", "BYTES=1-1", "bytes= 1-2 ,"]


@st.composite
def segment(draw: Any, likely: str, choices: list[str]) -> str:
    """Mostly a (variously encoded) plausible value, sometimes an odd one."""
    pick = draw(st.integers(0, 9))
    if pick < 2:
        return draw(st.sampled_from(ODD_SEGMENTS))
    value = likely if pick < 6 else draw(st.sampled_from(choices))
    return encode(value, draw(st.booleans()), draw(st.booleans()))


@st.composite
def query_string(draw: Any) -> str:
    pairs = []
    if draw(st.booleans()):  # a well-formed scope first, so that hits are common
        pairs.append((draw(st.sampled_from(["tenant_id", "account_handle"])), TENANT, "="))
        if draw(st.booleans()):
            pairs.append((draw(st.sampled_from(["namespace_id", "project_handle", "slug", "teamId"])),
                          draw(st.sampled_from(NAMESPACES)), "="))
    pairs += draw(st.lists(st.tuples(st.sampled_from(QUERY_NAMES), st.sampled_from(QUERY_VALUES),
                                     st.sampled_from(["=", "", "=="])), max_size=4))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    parts = [name + (sep if sep or value else "") + value for name, value, sep in pairs]
    if draw(st.integers(0, 5)) == 0:
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(["", "&", "=", "%"])))
    return "&".join(parts)


@st.composite
def download_request(draw: Any) -> bytes:
    path, key = ROUTES[draw(st.sampled_from(sorted(ROUTES)))]
    path = (path.replace("{t}", draw(segment(TENANT, [TENANT, "other"])))
            .replace("{n}", draw(segment("p", NAMESPACES)))
            .replace("{k}", draw(segment(key, KEYS))))
    if draw(st.integers(0, 9)) == 0:
        path += "/"
    query = draw(query_string())
    method = draw(st.sampled_from(["GET", "HEAD"]))
    target = path + ("?" + query if query or draw(st.booleans()) else "")
    assume(len(target) < 4000)  # gunicorn's request-line limit is answered before either path
    ranges = draw(st.sampled_from([0, 0, 1, 1, 1, 2]))  # usually one Range header, if any
    headers = "".join(f"Range: {draw(st.sampled_from(RANGES))}\r\n" for _ in range(ranges))
    if draw(st.integers(0, 9)) == 0:
        headers += 'If-Range: "x"\r\n'
    return f"{method} {target} HTTP/1.1\r\nHost: kura\r\n{headers}\r\n".encode("ascii")


class _App:
    """gunicorn's application object, reduced to what a worker asks of it."""

    def __init__(self, wsgi: Any) -> None:
        self._wsgi = wsgi

    def wsgi(self) -> Any:
        return self._wsgi


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Any]:
    from gunicorn import glogging
    from gunicorn.config import Config

    from app.http import create_app
    from app.http_worker import KuraGeventWorker

    app = create_app(Settings(data_dir=str(tmp_path / "data"), tenant_id=TENANT))
    client = app.test_client()
    for template, namespace, key, body, content_type in STORED:
        url = template.replace("{k}", quote(key, safe="")) + f"?tenant_id={TENANT}&namespace_id={namespace}"
        turbo = template.startswith("/v8/")
        if turbo:
            url += f"&slug={namespace}"
        r = client.open(url, method="POST" if template.startswith("/api/cache/cas/") else "PUT",
                        data=body, content_type=content_type, headers=TURBO_KEPT if turbo else {})
        assert r.status_code in (200, 201, 202, 204), (url, r.data)
    for namespace, cas_id, value in KEYVALUE:
        assert client.put(f"/api/cache/keyvalue?tenant_id={TENANT}&namespace_id={namespace}",
                          json={"cas_id": cas_id, "entries": [{"value": value}]}).status_code == 204
    cfg = Config()
    gunicorn_worker = KuraGeventWorker(0, os.getpid(), [], _App(app), 30, cfg, glogging.Logger(cfg))
    gunicorn_worker.load_wsgi()
    assert gunicorn_worker._fast_reads is not None
    yield gunicorn_worker
    gunicorn_worker.tmp.close()
    app.extensions["kura"].store.close()


def exchange(worker: Any, raw_request: bytes, fast_path_first: bool) -> bytes:
    """Send ``raw_request`` to the worker, parsed as production parses it with the fast path
    on (``app.http1_parser``: the light parser, gunicorn's for what the fast path declines)
    or by gunicorn's parser alone; the raw answer."""
    from gunicorn.http.parser import RequestParser

    from app.http1_parser import KuraRequestParser

    server, client = socket.socketpair()

    def read_all() -> bytes:
        chunks = []
        while chunk := client.recv(1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)

    answer = _READER.submit(read_all)  # a large body does not fit the socket buffer
    try:
        client.sendall(raw_request)
        parser = KuraRequestParser if fast_path_first else RequestParser
        req = next(parser(worker.cfg, server, ("127.0.0.1", 1)))
        handler = worker.handle_request if fast_path_first else super(type(worker), worker).handle_request
        try:
            handler("127.0.0.1:4000", req, server, ("127.0.0.1", 1))
        except StopIteration:
            pass  # gunicorn's signal to close the connection after the answer
    finally:
        server.close()
    try:
        return answer.result(10)
    finally:
        client.close()


_READER = ThreadPoolExecutor(1)


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def test_fast_path_and_blueprint_agree_on_generated_requests(worker: Any) -> None:
    stats: Counter[str] = Counter()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(download_request())
    def agree(raw_request: bytes) -> None:
        fast = parse_answer(exchange(worker, raw_request, fast_path_first=True))
        slow = parse_answer(exchange(worker, raw_request, fast_path_first=False))
        served_fast = fast[1].get("server") == "kura"
        assert slow[1].get("server") != "kura"
        assert fast[0] == slow[0], raw_request
        for name in ("content-type", "content-length", "content-range", "accept-ranges", *TURBO_KEPT):
            assert fast[1].get(name) == slow[1].get(name), (raw_request, name)
        assert fast[2] == slow[2], raw_request
        if raw_request.split(b" ")[1].startswith(b"/v8/") and fast[0] in (200, 206):
            assert {name: fast[1][name] for name in TURBO_KEPT} == TURBO_KEPT
            stats["turbo hits"] += 1
        stats["cases"] += 1
        stats["served by the fast path"] += served_fast
        stats[f"status {slow[0]}"] += 1

    agree()
    print(dict(stats))
    assert stats["cases"] >= MAX_EXAMPLES
    # The generator reaches hits, misses and refusals alike, and the fast path answers
    # every hit it makes.
    assert stats["served by the fast path"] == stats["status 200"] + stats["status 206"]
    assert stats["status 200"] >= MAX_EXAMPLES // 10 and stats["status 206"] >= MAX_EXAMPLES // 50
    assert stats["status 416"] >= MAX_EXAMPLES // 300
    assert stats["status 400"] >= MAX_EXAMPLES // 10 and stats["status 404"] >= MAX_EXAMPLES // 10
    assert stats["turbo hits"] >= MAX_EXAMPLES // 100


@pytest.mark.parametrize("target,status", [
    (f"/api/cache/cas/c1?tenant_id=&account_handle={TENANT}", 400),
    (f"/api/cache/cas/c1?account_handle={TENANT}&namespace_id=&project_handle=p", 200),
    (f"/api/cache/cas/c1?tenant_id={TENANT}&tenant_id=", 400),
    ("/api/cache/cas/c1?tenant_id=a%2Fb", 400),
    ("/api/cache/cas/c1?tenant_id=%FF", 400),
    (f"/api/cache/cas/%63%31?tenant_id={TENANT}", 200),
    (f"/gradle/{TENANT}/%5F/g1", 200),
    (f"/gradle/{TENANT}/_/%C3%A9/", 200),
    ("/v1/cache/n1?namespace_id=&project_handle=p", 200),
])
def test_both_paths_read_the_same_target(worker: Any, target: str, status: int) -> None:
    """Cases that once differed: ``?tenant_id=&account_handle=a`` was a fast-path 200 and a
    blueprint 400; an empty namespace with an alias read the alias on a hit and the
    tenant-wide namespace on a miss; the tenant was never validated on the fast path.
    Percent-encoded paths are now answered by the fast path too."""
    raw = f"GET {target} HTTP/1.1\r\nHost: kura\r\n\r\n".encode()
    fast = parse_answer(exchange(worker, raw, fast_path_first=True))
    slow = parse_answer(exchange(worker, raw, fast_path_first=False))
    assert (fast[0], fast[2]) == (slow[0], slow[2]) and fast[0] == status
    if status == 200:
        assert fast[1]["server"] == "kura", "a hit is answered by the fast path"
