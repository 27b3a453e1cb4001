"""The internal peer API of a real node: Kura's routes, the batch routes, bad and truncated input."""
from __future__ import annotations

import io
import os
import socket
import time
from urllib.parse import quote

import pytest
import requests

from app.replication.frames import FrameReader, encode_header
from app.storage.keys import artifact_id
from tests.mesh import TENANT, gradle_path, wait_until


@pytest.fixture(scope="module")
def peer(tmp_path_factory):  # type: ignore[no-untyped-def]
    from tests.nodes import make_node

    node = make_node(tmp_path_factory.mktemp("internal"), "node", KURA_PEER_IDLE_TIMEOUT_MS="1500")
    node.env["KURA_NODE_URL"] = node.internal_url
    node.start()
    yield node
    node.stop()


def replicate_url(peer, key: str, version: int, overrides: dict[str, str] | None = None) -> str:  # type: ignore[no-untyped-def]
    query = {"producer": "gradle", "inline": "false", "namespace_id": "", "key": key,
             "content_type": "application/x-test", "version_ms": str(version), **(overrides or {})}
    return peer.internal_url + "/_internal/replicate/artifact?" + "&".join(
        f"{k}={quote(v, safe='')}" for k, v in query.items())


def public_get(peer, key: str) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.get(peer.url + gradle_path(key), timeout=10)


def test_status_and_public_port_separation(peer) -> None:
    doc = requests.get(peer.internal_url + "/_internal/status", timeout=5).json()
    assert doc == {"region": "local", "tenant_id": "default", "node_url": peer.internal_url,
                   "known_peers": {}}
    r = requests.get(peer.url + "/_internal/status", timeout=5)
    assert r.status_code == 404 and r.json() == {"message": "Not found"}
    r = requests.get(peer.internal_url + "/api/cache/gradle/x?tenant_id=default", timeout=5)
    assert r.status_code == 404  # and no public route on the internal port


def test_kura_replicate_route_is_last_writer_wins_and_counted(peer) -> None:
    r = requests.put(replicate_url(peer, "kura-route", 5_000), data=b"first", timeout=10)
    assert r.status_code == 204
    got = public_get(peer, "kura-route")
    assert got.content == b"first" and got.headers["Content-Type"] == "application/x-test"
    # Older: acknowledged, ignored, without reading the body.
    r = requests.put(replicate_url(peer, "kura-route", 4_000), data=b"older", timeout=10)
    assert r.status_code == 204 and public_get(peer, "kura-route").content == b"first"
    r = requests.put(replicate_url(peer, "kura-route", 6_000), data=b"newer", timeout=10)
    assert r.status_code == 204 and public_get(peer, "kura-route").content == b"newer"
    metrics = requests.get(peer.url + "/metrics", timeout=5).text
    assert ('kura_replication_apply_results_total{item_type="artifact",outcome="ignored_stale",'
            'source="replication"} 1.0') in metrics
    # The bootstrap route serves the stored body and its version.
    aid = artifact_id("gradle", TENANT, "", "kura-route").hex()
    r = requests.get(peer.internal_url + f"/_internal/bootstrap/artifacts/{aid}", timeout=5)
    assert r.content == b"newer" and r.headers["X-Kura-Version-Ms"] == "6000"
    missing = "0" * 64
    assert requests.get(peer.internal_url + f"/_internal/bootstrap/artifacts/{missing}",
                        timeout=5).status_code == 404


@pytest.mark.parametrize("query, message", [
    ({"producer": "nope"}, "Invalid producer"),
    ({"inline": "yes"}, "Invalid inline"),
    ({"version_ms": "-1"}, "Invalid version_ms"),
    ({"version_ms": "abc"}, "Invalid version_ms"),
    ({"key": "../x"}, "path traversal"),
    ({"key": ""}, "Missing key"),
])
def test_bad_replicated_artifacts_are_400(peer, query, message) -> None:
    r = requests.put(replicate_url(peer, "bad", 7_000, query), data=b"x", timeout=5)
    assert r.status_code == 400 and message in r.json()["message"]


def raw_request(peer, head: bytes, body: bytes, close_after: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    host, port = peer.internal_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        time.sleep(close_after)


def test_truncated_replication_is_never_visible(peer) -> None:
    url = replicate_url(peer, "truncated", 9_000).removeprefix(peer.internal_url)
    head = (f"PUT {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n").encode()
    raw_request(peer, head, b"only part of it")
    # A batch whose second body stops short: neither artifact may appear.
    frames = (encode_header({"t": "artifact", "producer": "gradle", "namespace_id": "", "key": "batch-1",
                             "content_type": "x", "inline": False, "size": 3, "version_ms": 9_000,
                             "origin": "http://o"}) + b"one"
              + encode_header({"t": "artifact", "producer": "gradle", "namespace_id": "", "key": "batch-2",
                               "content_type": "x", "inline": False, "size": 50, "version_ms": 9_000,
                               "origin": "http://o"}) + b"short")
    head = (f"POST /_internal/replicate/batch HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(frames) + 45}\r\n\r\n").encode()
    raw_request(peer, head, frames)
    time.sleep(2)  # past the idle timeout: the node gave up on both uploads
    for key in ("truncated", "batch-1", "batch-2"):
        assert public_get(peer, key).status_code == 404
    staged = os.listdir(os.path.join(peer.data_dir, "tmp", "staging"))
    assert staged == []


def test_batch_route_applies_a_whole_batch(peer) -> None:
    bodies = {f"b{i}": os.urandom(i * 1000) for i in range(20)}
    frames = b"".join(
        encode_header({"t": "artifact", "producer": "gradle", "namespace_id": "", "key": key,
                       "content_type": "application/octet-stream", "inline": False, "size": len(body),
                       "version_ms": 10_000, "origin": "http://o"}) + body
        for key, body in bodies.items())
    r = requests.post(peer.internal_url + "/_internal/replicate/batch", data=iter([frames[:7], frames[7:]]),
                      timeout=10)
    assert r.status_code == 200 and r.json() == {"artifacts": 20, "applied": 20}
    for key, body in bodies.items():
        assert public_get(peer, key).content == body
    # The bodies route serves them back in frames, a missing id as "missing".
    ids = [artifact_id("gradle", TENANT, "", key).hex() for key in bodies] + ["f" * 64]
    r = requests.post(peer.internal_url + "/_internal/bootstrap/bodies", json={"artifact_ids": ids},
                      timeout=10)
    reader = FrameReader(io.BytesIO(r.content).read)
    got = {}
    for header in reader.headers():
        if header["t"] == "missing":
            got[header["artifact_id"]] = None
            continue
        parts: list[bytes] = []
        reader.copy_body(header["size"], parts.append)
        got[header["key"]] = b"".join(parts)
        assert header["version_ms"] == 10_000 and header["origin"] == "http://o"
    assert got == {**bodies, "f" * 64: None}


def test_catalog_routes(peer) -> None:
    r = requests.delete(peer.internal_url + "/_internal/replicate/namespace?namespace_id=wiped&version_ms=123",
                        timeout=5)
    assert r.status_code == 204
    doc = requests.get(peer.internal_url + "/_internal/bootstrap/namespace_tombstones?limit=10", timeout=5).json()
    assert {"namespace_id": "wiped", "version_ms": 123} in doc["tombstones"] and doc["next_after"] is None
    doc = requests.get(peer.internal_url + "/_internal/bootstrap/digest?prefix_len=2", timeout=5).json()
    assert doc["prefix_len"] == 2 and all(len(b["prefix"]) == 2 and b["count"] > 0 for b in doc["buckets"])
    page = requests.get(peer.internal_url + "/_internal/bootstrap/manifests?limit=2", timeout=5).json()
    assert len(page["manifests"]) == 2 and page["next_after"] == page["manifests"][1]["artifact_id"]
    first = page["manifests"][0]
    assert set(first) >= {"artifact_id", "producer", "namespace_id", "key", "content_type", "inline",
                          "size", "version_ms", "origin"}
    for bad in ("limit=0", "limit=x", "prefix=zz", "after=nothex", "prefix_len=9"):
        path = "digest" if bad.startswith("prefix_len") else "manifests"
        r = requests.get(peer.internal_url + f"/_internal/bootstrap/{path}?{bad}", timeout=5)
        assert r.status_code == 400 and r.json()["message"].startswith("Invalid"), bad


def test_a_peer_of_another_tenant_is_never_admitted(tmp_path, peer) -> None:
    from tests.nodes import make_node

    other = make_node(tmp_path, "other", KURA_TENANT_ID="someone-else", KURA_PEERS=peer.internal_url,
                      KURA_HTTP_WORKERS="1")
    other.env["KURA_NODE_URL"] = other.internal_url
    other.start()
    try:
        doc = requests.get(other.url + "/ready", timeout=5).json()
        assert doc["ready"] and doc["known_peers"] == [] and doc["initial_discovery_completed"]
        wait_until(lambda: requests.get(other.url + "/up", timeout=5).json()["generation"] >= 1, 5,
                   "discovery")
    finally:
        other.stop()


def turbo_frame(key: str, body: bytes, headers: object) -> bytes:
    return encode_header({"t": "artifact", "producer": "turbo", "namespace_id": "acme", "key": key,
                          "content_type": "application/octet-stream", "inline": False,
                          "size": len(body), "version_ms": 20_000, "origin": "http://o",
                          "headers": headers}) + body


def test_kept_headers_travel_with_the_version(peer) -> None:
    """Turborepo's x-artifact-duration/x-artifact-tag arrive in the frame header, are served
    with the body, and are listed and framed again for a peer that bootstraps."""
    kept = {"x-artifact-duration": "77", "x-artifact-tag": "dGFn"}
    r = requests.post(peer.internal_url + "/_internal/replicate/batch",
                      data=turbo_frame("t1", b"tarball", kept), timeout=10)
    assert r.status_code == 200 and r.json() == {"artifacts": 1, "applied": 1}
    got = requests.get(peer.url + "/v8/artifacts/t1?slug=acme", timeout=10)
    assert got.content == b"tarball"
    assert {name: got.headers[name] for name in kept} == kept
    aid = artifact_id("turbo", TENANT, "acme", "t1").hex()
    page = requests.get(peer.internal_url + f"/_internal/bootstrap/manifests?prefix={aid[:8]}",
                        timeout=5).json()
    assert [m["headers"] for m in page["manifests"] if m["artifact_id"] == aid] == [kept]
    r = requests.post(peer.internal_url + "/_internal/bootstrap/bodies", json={"artifact_ids": [aid]},
                      timeout=10)
    header = next(FrameReader(io.BytesIO(r.content).read).headers())
    assert header["headers"] == kept and header["key"] == "t1"


@pytest.mark.parametrize("headers, message", [
    ("x-artifact-tag", "Invalid headers"),
    ({"X-Upper": "v"}, "Invalid header name"),
    ({"x-artifact-tag": "a\r\nset-cookie: x"}, "Invalid x-artifact-tag"),
    ({f"h{i}": "v" for i in range(9)}, "Invalid headers"),
])
def test_malformed_kept_headers_from_a_peer_are_400(peer, headers, message) -> None:
    r = requests.post(peer.internal_url + "/_internal/replicate/batch",
                      data=turbo_frame("t-bad", b"x", headers), timeout=10)
    assert r.status_code == 400 and r.json()["message"].startswith(message)
    assert requests.get(peer.url + "/v8/artifacts/t-bad?slug=acme", timeout=10).status_code == 404
