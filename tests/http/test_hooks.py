"""Lua hooks on every public HTTP route, with real Lua (lupa) and the shipped examples."""
from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHA_Z = hashlib.sha256(b"z").hexdigest()
RO = {"Authorization": "Bearer ro-token"}
RW = {"Authorization": "Bearer rw-token"}

WRITE_ROUTES = [
    ("POST", "/api/cache/cas/blob1?tenant_id=t", b"x"),
    ("PUT", "/api/cache/keyvalue?tenant_id=t", b'{"cas_id":"c","entries":[]}'),
    ("POST", "/api/cache/module/start?tenant_id=t&hash=h&name=n", b""),
    ("POST", "/api/cache/module/part?tenant_id=t&upload_id=u&part_number=1", b"p"),
    ("POST", "/api/cache/module/complete?tenant_id=t&upload_id=u", b'{"parts":[1]}'),
    ("PUT", "/api/cache/gradle/k?tenant_id=t", b"g"),
    ("PUT", "/gradle/t/_/k", b"g"),
    ("PUT", "/v1/cache/h", b"n"),
    ("PUT", "/nx/proj/v1/cache/h", b"n"),
    ("PUT", "/api/metro/cache/m", b"m"),
    ("PUT", f"/ac/{SHA_Z}", b"a"),
    ("PUT", f"/proj/cas/{SHA_Z}", b"z"),
    ("DELETE", "/api/cache/clean?tenant_id=t", b""),
]
READ_ROUTES = [
    ("GET", "/api/cache/cas/blob1?tenant_id=t"),
    ("GET", "/api/cache/keyvalue/c?tenant_id=t"),
    ("HEAD", "/api/cache/module/x?tenant_id=t&hash=h&name=n"),
    ("GET", "/api/cache/module/x?tenant_id=t&hash=h&name=n"),
    ("GET", "/api/cache/gradle/k?tenant_id=t"),
    ("GET", "/gradle/t/_/k"),
    ("GET", "/v1/cache/h"),
    ("GET", "/api/metro/cache/m"),
    ("GET", f"/ac/{SHA_Z}"),
    ("HEAD", f"/proj/cas/{SHA_Z}"),
]


@pytest.fixture
def token_client(hooked_app):  # type: ignore[no-untyped-def]
    app = hooked_app(REPO / "examples/hooks/static_tokens.lua",
                     KURA_EXTENSION_STATIC_READ_TOKENS="ro-token",
                     KURA_EXTENSION_STATIC_WRITE_TOKENS="rw-token")
    return app.test_client()


@pytest.mark.parametrize("method,url,body", WRITE_ROUTES)
def test_read_only_token_is_forbidden_on_every_write_route(token_client, method, url, body) -> None:
    r = token_client.open(url, method=method, data=body, headers=RO)
    assert r.status_code == 403, r.data
    assert r.json == {"message": "Token is read-only"}


def test_nothing_was_written_by_the_read_only_token(token_client) -> None:
    for method, url, body in WRITE_ROUTES:
        token_client.open(url, method=method, data=body, headers=RO)
    for method, url in READ_ROUTES:
        assert token_client.open(url, method=method, headers=RW).status_code == 404


# What each read route answers once the write routes above have run with the RW token.
READ_ANSWERS = {
    "/api/cache/cas/blob1?tenant_id=t": (200, b"x"),
    "/api/cache/keyvalue/c?tenant_id=t": (200, b'{"entries":[]}'),
    "/api/cache/module/x?tenant_id=t&hash=h&name=n": (200, b"module"),
    "/api/cache/gradle/k?tenant_id=t": (200, b"g"),
    "/gradle/t/_/k": (200, b"g"),
    "/v1/cache/h": (200, b"n"),
    "/api/metro/cache/m": (200, b"m"),
    f"/ac/{SHA_Z}": (200, b"a"),
}


def _write_everything(client) -> None:  # type: ignore[no-untyped-def]
    for method, url, body, status in [
        ("POST", "/api/cache/cas/blob1?tenant_id=t", b"x", 204),
        ("PUT", "/api/cache/keyvalue?tenant_id=t", b'{"cas_id":"c","entries":[]}', 204),
        ("PUT", "/gradle/t/_/k", b"g", 201),
        ("PUT", "/v1/cache/h", b"n", 200),
        ("PUT", "/api/metro/cache/m", b"m", 200),
        ("PUT", f"/ac/{SHA_Z}", b"a", 200),
        ("PUT", f"/proj/cas/{SHA_Z}", b"z", 200),
    ]:
        assert client.open(url, method=method, data=body, headers=RW).status_code == status, url
    upload_id = client.post("/api/cache/module/start?tenant_id=t&hash=h&name=n", headers=RW).json["upload_id"]
    assert client.post(f"/api/cache/module/part?tenant_id=t&upload_id={upload_id}&part_number=1",
                       data=b"module", headers=RW).status_code == 204
    assert client.post(f"/api/cache/module/complete?tenant_id=t&upload_id={upload_id}",
                       json={"parts": [1]}, headers=RW).status_code == 204


@pytest.mark.parametrize("method,url", READ_ROUTES)
def test_read_only_token_can_read(token_client, method, url) -> None:
    _write_everything(token_client)
    r = token_client.open(url, method=method, headers=RO)
    if method == "HEAD":  # the module cache answers 204, a plain download 200
        assert r.status_code == (204 if "/module/" in url else 200) and r.data == b""
    else:
        assert (r.status_code, r.data) == READ_ANSWERS[url]


def test_read_write_token_round_trip_and_missing_token(token_client) -> None:
    assert token_client.put("/api/cache/gradle/k2?tenant_id=t", data=b"v", headers=RW).status_code == 201
    assert token_client.get("/api/cache/gradle/k2?tenant_id=t", headers=RO).data == b"v"
    r = token_client.get("/api/cache/gradle/k2?tenant_id=t")
    assert r.status_code == 401 and r.json == {"message": "Missing bearer token"}
    r = token_client.get("/api/cache/gradle/k2?tenant_id=t", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_probes_and_metrics_are_never_hooked(token_client) -> None:
    for path in ("/up", "/ready", "/status/rollout", "/metrics"):
        assert token_client.get(path).status_code in (200, 503)


BASIC_AND_SIGNING = """
function authenticate(ctx)
  local auth = ctx.headers.authorization or ""
  if auth == "Basic " .. "dXNlcjpzZWNyZXQ=" then
    return { principal = { id = "gradle-user", kind = "basic", attributes = {} } }
  end
  return { deny = { status = 401, message = "who are you" } }
end

function authorize(ctx, principal)
  if ctx.tenant_id ~= ctx.server_tenant_id then return { allow = false } end
  return { allow = true }
end

function response_headers(ctx, principal)
  return { headers = { ["x-kura-route"] = ctx.route },
           sign = { header = "x-kura-signature", signer = "edge",
                    payload = ctx.route .. "|" .. tostring(ctx.status_code) } }
end
"""


def test_stock_gradle_basic_credentials_and_signed_headers(hooked_app) -> None:
    secret = b"edge-secret"
    app = hooked_app(BASIC_AND_SIGNING, KURA_EXTENSION_SIGNER_EDGE_SECRET=base64.b64encode(secret).decode())
    client = app.test_client()
    basic = {"Authorization": "Basic dXNlcjpzZWNyZXQ="}
    r = client.put("/gradle/default/_/cache-key", data=b"out", headers=basic)
    assert r.status_code == 201
    assert r.headers["x-kura-route"] == "/gradle/{tenant_id}/{namespace_id}/{cache_key}"
    payload = "/gradle/{tenant_id}/{namespace_id}/{cache_key}|201"
    expected = base64.b64encode(hmac.new(secret, payload.encode(), hashlib.sha256).digest()).decode()
    assert r.headers["x-kura-signature"] == expected
    assert client.get("/gradle/default/_/cache-key", headers=basic).data == b"out"
    assert client.get("/gradle/default/_/cache-key").status_code == 401
    # Tenant routing: another tenant's path is refused by authorize.
    r = client.get("/gradle/other-tenant/_/cache-key", headers=basic)
    assert r.status_code == 403 and r.json == {"message": "Forbidden"}
