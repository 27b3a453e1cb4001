"""Turborepo's remote cache routes (``/v8/artifacts``) on the Flask app, real LMDB, real Lua."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEPT = {"x-artifact-duration": "1234", "x-artifact-tag": "c2lnbmF0dXJl"}


def turbo_error(code: str, message: str) -> dict:
    return {"message": message, "error": {"code": code, "message": message}}


def test_upload_keeps_duration_and_tag_and_every_download_returns_them(client) -> None:
    r = client.put("/v8/artifacts/abc123?slug=acme", data=b"tarball", headers=KEPT)
    assert r.status_code == 202 and r.json == {"urls": ["/v8/artifacts/abc123"]}
    got = client.get("/v8/artifacts/abc123?slug=acme")
    assert got.status_code == 200 and got.data == b"tarball"
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert {name: got.headers[name] for name in KEPT} == KEPT
    head = client.head("/v8/artifacts/abc123?slug=acme")
    assert head.status_code == 200 and head.data == b"" and head.headers["Content-Length"] == "7"
    assert {name: head.headers[name] for name in KEPT} == KEPT
    # An overwrite without them drops them: they belong to the version.
    assert client.put("/v8/artifacts/abc123?slug=acme", data=b"v2").status_code == 202
    again = client.get("/v8/artifacts/abc123?slug=acme")
    assert again.data == b"v2" and "x-artifact-duration" not in again.headers
    assert "x-artifact-tag" not in again.headers


def test_the_team_is_the_namespace(client) -> None:
    client.put("/v8/artifacts/h1?teamId=team_a", data=b"team-a")
    client.put("/v8/artifacts/h1?slug=b", data=b"slug-b")
    client.put("/v8/artifacts/h1", data=b"no-team")
    assert client.get("/v8/artifacts/h1?teamId=team_a&slug=b").data == b"team-a"  # teamId first
    assert client.get("/v8/artifacts/h1?slug=b").data == b"slug-b"
    assert client.get("/v8/artifacts/h1").data == b"no-team"
    assert client.get("/v8/artifacts/h1?slug=turbo").data == b"no-team"  # the default namespace
    miss = client.get("/v8/artifacts/h1?slug=c")
    assert miss.status_code == 404 and miss.json == turbo_error("not_found", "Artifact not found")
    assert client.head("/v8/artifacts/h1?slug=c").status_code == 404


def test_query_reports_size_duration_and_tag_per_hash(client) -> None:
    client.put("/v8/artifacts/h1?slug=acme", data=b"12345", headers=KEPT)
    client.put("/v8/artifacts/h2?slug=acme", data=b"xy")
    r = client.post("/v8/artifacts?slug=acme", json={"hashes": ["h1", "h2", "h3"]})
    assert r.status_code == 200
    assert r.json == {"h1": {"size": 5, "taskDurationMs": 1234, "tag": "c2lnbmF0dXJl"},
                      "h2": {"size": 2, "taskDurationMs": 0}, "h3": None}
    assert client.post("/v8/artifacts?slug=other", json={"hashes": ["h1"]}).json == {"h1": None}


@pytest.mark.parametrize("body,message", [
    (b"{", "Invalid artifact query: malformed JSON (JSONDecodeError)"),
    (b'{"hashes": "h1"}', 'Invalid artifact query: expected {"hashes": [...]} with at most 1000 strings'),
    (b'{"hashes": [1]}', 'Invalid artifact query: expected {"hashes": [...]} with at most 1000 strings'),
    (b'["h1"]', 'Invalid artifact query: expected {"hashes": [...]} with at most 1000 strings'),
    (b'{"hashes": ["../x"]}', "Invalid hash: slashes are not allowed"),
])
def test_a_malformed_query_is_a_400_in_turbos_shape(client, body: bytes, message: str) -> None:
    r = client.post("/v8/artifacts", data=body, content_type="application/json")
    assert r.status_code == 400 and r.json == turbo_error("bad_request", message)


def test_status_and_events(client) -> None:
    assert client.get("/v8/artifacts/status?teamId=team_a").json == {"status": "enabled"}
    events = [{"sessionId": "s", "source": "REMOTE", "event": "HIT", "hash": "h1", "duration": 5}]
    r = client.post("/v8/artifacts/events?slug=acme", json=events)
    assert r.status_code == 200 and r.data == b""
    r = client.post("/v8/artifacts/events", json={"event": "HIT"})
    assert r.status_code == 400
    assert r.json == turbo_error("bad_request", "Invalid events: expected a JSON array")


@pytest.mark.parametrize("headers,message", [
    ({"x-artifact-duration": "soon"}, "Invalid x-artifact-duration"),
    ({"x-artifact-duration": "-1"}, "Invalid x-artifact-duration"),
    ({"x-artifact-duration": "9" * 20}, "Invalid x-artifact-duration"),
    ({"x-artifact-tag": "t" * 1025},
     "Invalid x-artifact-tag: expected printable ASCII, at most 1024 characters"),
    ({"x-artifact-tag": "caf\u00e9"},
     "Invalid x-artifact-tag: expected printable ASCII, at most 1024 characters"),
])
def test_a_malformed_kept_header_refuses_the_upload(client, headers: dict, message: str) -> None:
    r = client.put("/v8/artifacts/h1", data=b"x", headers=headers)
    assert r.status_code == 400 and r.json == turbo_error("bad_request", message)
    assert client.get("/v8/artifacts/h1").status_code == 404


@pytest.mark.parametrize("hash_", ["status", "events"])
def test_route_names_are_not_hashes(client, hash_: str) -> None:
    r = client.put(f"/v8/artifacts/{hash_}", data=b"x")
    assert r.status_code == 400
    assert r.json == turbo_error("bad_request", f"Invalid hash: '{hash_}' is reserved")


def test_a_wrong_method_names_the_allowed_ones(client) -> None:
    r = client.delete("/v8/artifacts/h1")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD, PUT"


# What the hooks see on each route, and Bearer tokens through the shipped example.
RECORDING = """
function authenticate(ctx)
  if ctx.headers.authorization ~= "Bearer turbo-token" then
    return { deny = { status = 401, message = "Invalid token" } }
  end
  return { principal = { id = "ci", kind = "token", attributes = {} } }
end

function authorize(ctx, principal)
  if ctx.namespace_id == "locked" then return { allow = false } end
  return { allow = true }
end

function response_headers(ctx, principal)
  return { headers = { ["x-seen"] = table.concat({ ctx.route, ctx.method, ctx.operation,
    ctx.producer, ctx.tenant_id, ctx.namespace_id or "-", ctx.artifact_key or "-",
    ctx.artifact_hash or "-" }, "|") } }
end
"""
TOKEN = {"Authorization": "Bearer turbo-token"}


def test_the_hooks_see_the_route_operation_producer_and_team(hooked_app) -> None:
    client = hooked_app(RECORDING, tenant="acme").test_client()
    cases = [
        ("PUT", "/v8/artifacts/h1?slug=web", b"x",
         "/v8/artifacts/{hash}|PUT|artifact.write|turbo|acme|web|h1|h1"),
        ("GET", "/v8/artifacts/h1?slug=web", b"",
         "/v8/artifacts/{hash}|GET|artifact.read|turbo|acme|web|h1|h1"),
        ("HEAD", "/v8/artifacts/h1?teamId=team_x", b"",
         "/v8/artifacts/{hash}|HEAD|artifact.inspect|turbo|acme|team_x|h1|h1"),
        ("POST", "/v8/artifacts", b'{"hashes": []}',
         "/v8/artifacts|POST|artifact.inspect|turbo|acme|turbo|-|-"),
        ("GET", "/v8/artifacts/status?slug=web", b"",
         "/v8/artifacts/status|GET|capabilities.read|turbo|acme|web|-|-"),
        ("POST", "/v8/artifacts/events?slug=web", b"[]",
         "/v8/artifacts/events|POST|request|turbo|acme|web|-|-"),
    ]
    for method, url, body, seen in cases:
        r = client.open(url, method=method, data=body, headers=TOKEN, content_type="application/json")
        assert r.status_code in (200, 202, 404), (url, r.data)
        assert r.headers["x-seen"] == seen
    r = client.put("/v8/artifacts/h1?slug=web", data=b"x")
    assert r.status_code == 401 and r.json == turbo_error("unauthorized", "Invalid token")
    r = client.put("/v8/artifacts/h1?slug=locked", data=b"x", headers=TOKEN)
    assert r.status_code == 403 and r.json == turbo_error("forbidden", "Forbidden")


def test_a_read_only_token_reads_but_cannot_write(hooked_app) -> None:
    client = hooked_app(REPO / "examples/hooks/static_tokens.lua",
                        KURA_EXTENSION_STATIC_READ_TOKENS="ro-token",
                        KURA_EXTENSION_STATIC_WRITE_TOKENS="rw-token").test_client()
    ro, rw = {"Authorization": "Bearer ro-token"}, {"Authorization": "Bearer rw-token"}
    r = client.put("/v8/artifacts/h1", data=b"x", headers=ro)
    assert r.status_code == 403 and r.json == turbo_error("forbidden", "Token is read-only")
    assert client.put("/v8/artifacts/h1", data=b"x", headers=rw).status_code == 202
    assert client.get("/v8/artifacts/h1", headers=ro).data == b"x"
    assert client.head("/v8/artifacts/h1", headers=ro).status_code == 200
    assert client.post("/v8/artifacts", json={"hashes": ["h1"]}, headers=ro).json == {
        "h1": {"size": 1, "taskDurationMs": 0}}
    assert client.get("/v8/artifacts/status", headers=ro).json == {"status": "enabled"}


@pytest.mark.parametrize("query,message", [
    ("teamId=a%2Fb", "Invalid teamId: slashes are not allowed"),
    ("slug=..", "Invalid slug: path traversal is not allowed"),
])
def test_a_malformed_team_is_a_400_naming_the_parameter(client, query: str, message: str) -> None:
    r = client.get(f"/v8/artifacts/h1?{query}")
    assert r.status_code == 400 and r.json == turbo_error("bad_request", message)
