"""HTTP Range reads on every download route of a real node (``app.http.ranges``).

Every route declared as a read is exercised (the table is checked against the route
declarations), with a small body, a body in a shared segment and a body of ≥ 8 MiB that
has a segment file of its own; the Xcode key-value documents are inline in LMDB. Both
the download fast path (no hooks) and the blueprints (hooks on: everything goes through
Flask) answer, and the egress byte counter grows by the bytes sent, not the body size.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from app.http import create_app
from app.http.routes import READ, SPECS
from app.settings import Settings
from app.storage.store import ADOPT_MIN_BYTES
from tests.mesh import MeshNode
from tests.nodes import REPO, Node, make_node

T = "tenant_id=default"
SIZES = {"small": 1000, "shared_segment": 300_000, "own_segment": ADOPT_MIN_BYTES + 1_000_003}
Upload = Callable[[requests.Session, str, str, bytes], None]


def _ok(response: requests.Response) -> None:
    assert response.status_code in (200, 201, 202, 204), (response.status_code, response.text)


def _module_upload(s: requests.Session, url: str, key: str, body: bytes) -> None:
    upload_id = s.post(f"{url}/api/cache/module/start?{T}&hash={key}&name=M.zip").json()["upload_id"]
    _ok(s.post(f"{url}/api/cache/module/part?{T}&upload_id={upload_id}&part_number=1", data=body))
    _ok(s.post(f"{url}/api/cache/module/complete?{T}&upload_id={upload_id}", json={"parts": [1]}))


def _put(path: str) -> Upload:
    return lambda s, url, key, body: _ok(s.put(url + path.format(k=key), data=body))


def _sha(key: str, body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class Route:
    template: str
    path: str  # {k}: the key
    upload: Upload
    key: Callable[[str, bytes], str] = lambda key, body: key


ROUTES = [
    Route("/api/cache/cas/{id}", "/api/cache/cas/{k}?" + T,
          lambda s, url, key, body: _ok(s.post(f"{url}/api/cache/cas/{key}?{T}", data=body))),
    Route("/api/cache/module/{id}", "/api/cache/module/x?" + T + "&hash={k}&name=M.zip", _module_upload),
    Route("/api/cache/gradle/{cache_key}", "/api/cache/gradle/{k}?" + T, _put("/api/cache/gradle/{k}?" + T)),
    Route("/gradle/{tenant_id}/{namespace_id}/{cache_key}", "/gradle/default/p/{k}",
          _put("/gradle/default/p/{k}")),
    Route("/v1/cache/{hash}", "/v1/cache/{k}", _put("/v1/cache/{k}")),
    Route("/nx/{namespace_id}/v1/cache/{hash}", "/nx/p/v1/cache/{k}", _put("/nx/p/v1/cache/{k}")),
    Route("/api/metro/cache/{cache_key}", "/api/metro/cache/{k}", _put("/api/metro/cache/{k}")),
    Route("/v8/artifacts/{hash}", "/v8/artifacts/{k}?slug=p", _put("/v8/artifacts/{k}?slug=p")),
    Route("/ac/{hash}", "/ac/{k}", _put("/ac/{k}"), _sha),
    Route("/{namespace_id}/ac/{hash}", "/p/ac/{k}", _put("/p/ac/{k}"), _sha),
    Route("/cas/{hash}", "/cas/{k}", _put("/cas/{k}"), _sha),
    Route("/{namespace_id}/cas/{hash}", "/p/cas/{k}", _put("/p/cas/{k}"), _sha),
]
KEYVALUE = "/api/cache/keyvalue/{cas_id}"  # inline documents: stored by their own test below


def test_every_download_route_is_covered(tmp_path: Path) -> None:
    create_app(Settings(data_dir=str(tmp_path / "data"))).extensions["kura"].store.close()  # declares every route
    declared = {spec.template for spec in SPECS.values() if spec.operation == READ}
    assert declared == {route.template for route in ROUTES} | {KEYVALUE}


@pytest.fixture(scope="module", params=["fast_path", "blueprint"])
def range_node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    env = {"KURA_HTTP_WORKERS": "1"}
    if request.param == "blueprint":  # hooks on: every request goes through Flask
        env["KURA_EXTENSION_SCRIPT_PATH"] = str(REPO / "examples" / "hooks" / "static_tokens.lua")
        env["KURA_EXTENSION_STATIC_WRITE_TOKENS"] = "rw"
    node = make_node(tmp_path_factory.mktemp(request.param), "node", **env)
    node.start()
    yield node
    node.stop()


def _headers(node: Node) -> dict[str, str]:
    """Credentials the example hooks accept (ignored without hooks)."""
    return {"Authorization": "Bearer rw"} if "KURA_EXTENSION_SCRIPT_PATH" in node.env else {}


@pytest.fixture(scope="module")
def session(range_node: Node) -> requests.Session:
    s = requests.Session()
    s.headers.update(_headers(range_node))
    return s


def _cases(size: int) -> list[tuple[str, int, tuple[int, int] | None]]:
    """(Range header, status, (first, last) of a 206)."""
    mid = size // 3
    return [
        ("bytes=0-0", 206, (0, 0)),
        (f"bytes={mid}-{2 * mid}", 206, (mid, 2 * mid)),
        (f"bytes={mid}-", 206, (mid, size - 1)),
        (f"bytes={mid}-{size * 10}", 206, (mid, size - 1)),
        ("bytes=-7", 206, (size - 7, size - 1)),
        (f"bytes=-{size + 1}", 206, (0, size - 1)),
        (f"BYTES = {size - 1}-", 200, None),  # no spaces around "=" in the grammar: ignored
        (f"bytes= {size - 1}-", 206, (size - 1, size - 1)),
        ("bytes=0-1,5-9", 200, None),  # several ranges: the whole body
        ("bytes=9-5", 200, None),  # an invalid range-spec: ignored
        ("items=0-1", 200, None),
        (f"bytes={size}-", 416, None),
        (f"bytes={size}-{size + 5}", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=" + "9" * 5000 + "-", 416, None),
    ]


def _metric(node: Node, name: str, **labels: str) -> float:
    return MeshNode("n", node).metric(name, **labels)


@pytest.mark.parametrize("size_name", sorted(SIZES))
@pytest.mark.parametrize("route", ROUTES, ids=[r.template for r in ROUTES])
def test_range_reads(range_node: Node, session: requests.Session, route: Route, size_name: str) -> None:
    body = os.urandom(SIZES[size_name])
    key = route.key(f"r-{size_name}-{os.urandom(4).hex()}", body)
    route.upload(session, range_node.url, key, body)
    url = range_node.url + route.path.format(k=key)
    size = len(body)

    whole = session.get(url)
    assert whole.status_code == 200 and whole.content == body
    assert whole.headers["Accept-Ranges"] == "bytes" and "Content-Range" not in whole.headers
    head = session.head(url, headers={"Range": "bytes=0-0"})  # Range is for GET only
    if route.template != "/api/cache/module/{id}":  # module HEAD answers 204 without a body length
        assert head.status_code == 200 and head.headers["Content-Length"] == str(size)

    for header, status, span in _cases(size):
        r = session.get(url, headers={"Range": header})
        assert r.status_code == status, (header, r.status_code, r.text[:200])
        if status == 416:
            assert r.headers["Content-Range"] == f"bytes */{size}"
            document = r.json()
            # Turborepo's routes answer errors in turbo's shape (app.http.turbo), with the message.
            turbo_error = {"code": "requested_range_not_satisfiable", "message": "Range not satisfiable"}
            assert document.pop("error", None) == (turbo_error if route.template.startswith("/v8/") else None)
            assert document == {"message": "Range not satisfiable"}
        elif status == 206:
            first, last = span
            assert r.headers["Content-Range"] == f"bytes {first}-{last}/{size}", header
            assert r.headers["Content-Length"] == str(last - first + 1)
            assert r.content == body[first:last + 1], header
            assert r.headers["Accept-Ranges"] == "bytes"
        else:
            assert r.content == body and "Content-Range" not in r.headers, header
    assert session.get(url, headers={"Range": "bytes=0-3", "If-Range": '"x"'}).content == body


@pytest.mark.parametrize("route", [ROUTES[2], ROUTES[-1]], ids=["gradle", "bazel_cas"])
def test_large_range_is_sent_with_sendfile_and_counted_as_sent(range_node: Node, session: requests.Session,
                                                             route: Route) -> None:
    body = os.urandom(SIZES["own_segment"])
    key = route.key(f"big-{os.urandom(4).hex()}", body)
    route.upload(session, range_node.url, key, body)
    url = range_node.url + route.path.format(k=key)
    producer = "gradle" if "gradle" in route.template else "bazel"
    first, last = 3 * 1024 * 1024 + 17, 7 * 1024 * 1024 + 3
    sent_before = _metric(range_node, "kura_artifact_read_bytes_total", producer=producer)
    sendfile_before = _metric(range_node, "kura_artifact_serving_paths_total", path="sendfile")
    r = session.get(url, headers={"Range": f"bytes={first}-{last}"})
    assert r.status_code == 206 and r.content == body[first:last + 1]
    assert _metric(range_node, "kura_artifact_read_bytes_total", producer=producer) - sent_before == last - first + 1
    assert _metric(range_node, "kura_artifact_serving_paths_total", path="sendfile") - sendfile_before == 1
    assert session.get(url, headers={"Range": f"bytes={len(body)}-"}).status_code == 416
    assert _metric(range_node, "kura_artifact_read_bytes_total", producer=producer) - sent_before == last - first + 1


def test_range_reads_of_inline_keyvalue_documents(range_node: Node, session: requests.Session) -> None:
    doc = {"entries": [{"value": "v" * 5000}, {"value": "w"}]}
    _ok(session.put(f"{range_node.url}/api/cache/keyvalue?{T}", json={"cas_id": "kv-range", **doc}))
    stored = json.dumps(doc, separators=(",", ":")).encode()
    url = f"{range_node.url}/api/cache/keyvalue/kv-range?{T}"
    inline_before = _metric(range_node, "kura_artifact_serving_paths_total", path="inline")
    for header, status, span in _cases(len(stored)):
        r = session.get(url, headers={"Range": header})
        assert r.status_code == status, header
        if span is not None:
            assert r.content == stored[span[0]:span[1] + 1]
            assert r.headers["Content-Range"] == f"bytes {span[0]}-{span[1]}/{len(stored)}"
            assert r.headers["Content-Type"] == "application/json"
    assert _metric(range_node, "kura_artifact_serving_paths_total", path="inline") > inline_before


def test_a_miss_is_404_whatever_the_range(range_node: Node, session: requests.Session) -> None:
    r = session.get(f"{range_node.url}/v1/cache/absent", headers={"Range": "bytes=0-0"})
    assert r.status_code == 404 and r.json() == {"message": "Artifact not found"}
