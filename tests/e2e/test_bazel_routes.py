"""Bazel's HTTP cache protocol (``/ac/{sha256}``, ``/cas/{sha256}``, optionally under an
instance prefix) against a real node, as a client sees it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.mesh import MeshNode
from tests.nodes import Node, make_node


@pytest.fixture(scope="module")
def bazel_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshNode]:
    node = make_node(tmp_path_factory.mktemp("bazel"), "node", KURA_HTTP_WORKERS="1")
    node.start()
    yield MeshNode("node", node)
    node.stop()


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("prefix", ["", "/proj"])
@pytest.mark.parametrize("store", ["ac", "cas"])
def test_put_get_head_and_miss(bazel_node: MeshNode, store: str, prefix: str) -> None:
    body = os.urandom(100_000)
    digest = sha(body) if store == "cas" else sha(os.urandom(8))
    path = f"{prefix}/{store}/{digest}"
    assert bazel_node.get(path).status_code == 404
    r = requests.head(bazel_node.url + path, timeout=30)
    assert r.status_code == 404 and r.content == b""
    assert bazel_node.put(path, body).status_code == 200
    r = bazel_node.get(path)
    assert r.status_code == 200 and r.content == body
    assert r.headers["Content-Length"] == str(len(body))
    assert r.headers["Content-Type"] == "application/octet-stream"
    r = requests.head(bazel_node.url + path, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(body)) and r.content == b""
    assert bazel_node.put(path, body).status_code == 200  # a second upload is harmless
    # The prefix is the namespace: the other spelling misses.
    other = f"/{store}/{digest}" if prefix else f"/elsewhere/{store}/{digest}"
    assert bazel_node.get(other).status_code == 404


def test_cas_refuses_a_body_that_is_not_its_digest(bazel_node: MeshNode) -> None:
    body = os.urandom(50_000)
    wrong = sha(body + b"!")
    writes_before = bazel_node.metric("kura_artifact_writes_total", producer="bazel", result="rejected")
    r = bazel_node.put(f"/cas/{wrong}", body)
    assert r.status_code == 400 and r.json() == {"message": "Body does not match its sha256 digest"}
    assert bazel_node.get(f"/cas/{wrong}").status_code == 404
    assert bazel_node.metric("kura_artifact_writes_total", producer="bazel", result="rejected") == writes_before + 1
    # Nothing was stored under the body's own digest either.
    assert bazel_node.get(f"/cas/{sha(body)}").status_code == 404


def test_the_empty_blob(bazel_node: MeshNode) -> None:
    empty = sha(b"")
    assert bazel_node.put(f"/cas/{empty}", b"").status_code == 200
    r = bazel_node.get(f"/cas/{empty}")
    assert r.status_code == 200 and r.content == b"" and r.headers["Content-Length"] == "0"


@pytest.mark.parametrize("path,message", [
    ("/cas/abc", "Invalid sha256: expected 64 hex characters"),
    (f"/cas/{'g' * 64}", "Invalid sha256: expected 64 hex characters"),
    (f"/ac/{'a' * 65}", "Invalid sha256: expected 64 hex characters"),
    (f"/ac/{'a' * 64}%0A", "Invalid sha256: expected 64 hex characters"),  # passed `^...$`
    (f"/%2E%2E/ac/{'a' * 64}", "Invalid namespace_id: path traversal is not allowed"),
])
def test_bad_names_are_400(bazel_node: MeshNode, path: str, message: str) -> None:
    for r in (bazel_node.get(path), bazel_node.put(path, b"x")):
        assert r.status_code == 400 and r.json() == {"message": message}, path


def test_an_encoded_slash_in_the_prefix_is_a_path_of_another_shape(bazel_node: MeshNode) -> None:
    for r in (bazel_node.get(f"/a%2Fb/cas/{'a' * 64}"), bazel_node.put(f"/a%2Fb/cas/{'a' * 64}", b"x")):
        assert r.status_code == 404 and r.json() == {"message": "Not found"}


def test_the_prefixed_routes_do_not_shadow_other_routes(bazel_node: MeshNode) -> None:
    r = bazel_node.put("/api/cache/cas/c1?tenant_id=default", b"x")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, POST"
    assert bazel_node.put("/nx/cas/v1/cache/h", b"nx").status_code == 200  # Nx namespace "cas"
    assert bazel_node.get("/nx/cas/v1/cache/h").content == b"nx"
    assert bazel_node.put("/gradle/default/ac/k", b"g").status_code == 201  # Gradle namespace "ac"
    assert bazel_node.get("/api/cache/gradle/k?tenant_id=default&namespace_id=ac").content == b"g"


def test_upper_case_digest_names_the_same_entry(bazel_node: MeshNode) -> None:
    body = b"case"
    assert bazel_node.put(f"/cas/{sha(body).upper()}", body).status_code == 200
    assert bazel_node.get(f"/cas/{sha(body)}").content == body


def test_wrong_method_is_405_with_allow(bazel_node: MeshNode) -> None:
    r = requests.post(f"{bazel_node.url}/ac/{'a' * 64}", data=b"x", timeout=30)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, PUT"
    assert r.json() == {"message": "Method not allowed"}


def test_metrics_carry_the_bazel_producer_and_route(bazel_node: MeshNode) -> None:
    body = os.urandom(10_000)
    path = f"/ci/cas/{sha(body)}"
    assert bazel_node.put(path, body).status_code == 200
    assert bazel_node.get(path).content == body
    assert bazel_node.metric("kura_http_requests_total", route="/{namespace_id}/cas/{hash}", status="200") >= 2
    assert bazel_node.metric("kura_artifact_writes_total", producer="bazel", result="ok") >= 1
    assert bazel_node.metric("kura_artifact_reads_total", producer="bazel", result="ok") >= 1
    assert bazel_node.metric("kura_artifact_read_bytes_total", producer="bazel") >= len(body)


HOOKS = """
function authenticate(ctx) return { anonymous = true } end
function authorize(ctx, principal)
  if ctx.operation == "artifact.write" and ctx.namespace_id == "readonly" then return { allow = false } end
  return { allow = true }
end
function response_headers(ctx, principal)
  return { headers = { ["x-ctx"] = table.concat({ ctx.route, ctx.operation, ctx.producer, ctx.tenant_id,
                                                  ctx.namespace_id or "", ctx.artifact_key,
                                                  ctx.artifact_hash }, "|") } }
end
"""


def test_hooks_see_the_bazel_target(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "hooks.lua"
    script.write_text(HOOKS)
    node: Node = node_factory("hooked", KURA_EXTENSION_SCRIPT_PATH=str(script), KURA_HTTP_WORKERS="1")
    body = b"hooked"
    digest = sha(body)
    r = requests.put(f"{node.url}/proj/cas/{digest}", data=body, timeout=30)
    assert r.status_code == 200
    assert r.headers["x-ctx"] == f"/{{namespace_id}}/cas/{{hash}}|artifact.write|bazel|default|proj|cas/{digest}|{digest}"
    r = requests.head(f"{node.url}/ac/{digest}", timeout=30)
    assert r.headers["x-ctx"] == f"/ac/{{hash}}|artifact.inspect|bazel|default|bazel|ac/{digest}|{digest}"
    r = requests.put(f"{node.url}/readonly/ac/{digest}", data=b"x", timeout=30)
    assert r.status_code == 403 and r.json() == {"message": "Forbidden"}
