"""kura.jwt_verify and kura.http_json against a local fake auth service."""
from __future__ import annotations

import socket
import threading
import time

import jwt
import pytest

from app.errors import Unauthenticated
from tests.extensions.conftest import http_ctx

SECRET = "a-jwt-secret-that-is-long-enough-for-hs512-keys-0123456789abcdef"
JWT_ENV = {"KURA_EXTENSION_JWT_VERIFIER_PRIMARY_ALGORITHM": "HS384",
           "KURA_EXTENSION_JWT_VERIFIER_PRIMARY_SECRET": SECRET,
           "KURA_EXTENSION_JWT_VERIFIER_PRIMARY_ISSUER": "https://issuer",
           "KURA_EXTENSION_JWT_VERIFIER_PRIMARY_AUDIENCES": "kura, other"}
JWT_SCRIPT = """
function authenticate(ctx)
  local token = string.gsub(ctx.headers.authorization, "^Bearer%s+", "")
  local ok, claims = pcall(kura.jwt_verify, "primary", token)
  if not ok then return { deny = { status = 401, message = tostring(claims) }, ttl_seconds = 0 } end
  return { principal = { id = claims.sub, kind = "user", attributes = claims }, ttl_seconds = 0 }
end"""


def _token(**overrides):
    claims = {"sub": "user-1", "iss": "https://issuer", "aud": "kura", "exp": int(time.time()) + 300,
              "grants": {"read": ["ios"]}}
    claims.update(overrides)
    algorithm = claims.pop("alg", "HS384")
    secret = claims.pop("secret", SECRET)
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_jwt_verify_accepts_valid_tokens(make_extensions) -> None:
    ext = make_extensions(JWT_SCRIPT, JWT_ENV)
    principal = ext.check(http_ctx(headers={"authorization": f"Bearer {_token()}"}))
    assert principal.id == "user-1"
    assert principal.attributes["grants"] == {"read": ["ios"]}


@pytest.mark.parametrize("overrides", [
    {"secret": "wrong-secret-wrong-secret-wrong-secret-wrong-secret-0123456789"}, {"iss": "https://evil"},
    {"aud": "someone-else"}, {"exp": int(time.time()) - 3600}, {"alg": "HS256"}, {"exp": None}])
def test_jwt_verify_rejects_invalid_tokens(make_extensions, overrides) -> None:
    ext = make_extensions(JWT_SCRIPT, JWT_ENV)
    claims = dict(overrides)
    if claims.get("exp", 0) is None:
        token = jwt.encode({"sub": "u", "iss": "https://issuer", "aud": "kura"}, SECRET, algorithm="HS384")
    else:
        token = _token(**claims)
    with pytest.raises(Unauthenticated) as info:
        ext.check(http_ctx(headers={"authorization": f"Bearer {token}"}))
    assert "JWT verification failed" in info.value.message
    assert token not in info.value.message


HTTP_SCRIPT = """
function authenticate(ctx)
  local response = kura.http_json("auth", {
    method = "POST", path = "/verify", headers = { ["x-trace"] = "t" },
    query = { scope = ctx.operation }, body = { token = ctx.headers.authorization },
  })
  if response.status == 200 and response.body.active then
    return { principal = { id = response.body.sub, kind = "user" } }
  end
  return { deny = { status = 401, message = "Invalid token " .. response.status } }
end"""


def test_http_json_with_50_concurrent_requests(make_extensions, auth_service) -> None:
    seen_headers: list[dict[str, str]] = []

    def handler(method, path, headers, body):
        seen_headers.append(headers)
        time.sleep(0.02)
        token = body["token"]
        if path.startswith("/verify?scope=artifact.read") and token.startswith("Bearer user-"):
            return 200, {"active": True, "sub": token.split(" ", 1)[1]}
        return 401, {"active": False}

    service = auth_service(handler)
    ext = make_extensions(HTTP_SCRIPT, {"KURA_EXTENSION_HTTP_CLIENT_AUTH_BASE_URL": service.url + "/",
                                        "KURA_EXTENSION_HTTP_CLIENT_AUTH_HEADERS_X_SERVICE_KEY": "k1"})
    results: dict[int, str] = {}

    def call(i: int) -> None:
        token = f"user-{i}" if i % 5 else f"bad-{i}"
        try:
            results[i] = ext.check(http_ctx(headers={"authorization": f"Bearer {token}"})).id
        except Unauthenticated as exc:
            results[i] = exc.message

    threads = [threading.Thread(target=call, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(service.calls) == 50
    for i in range(50):
        assert results[i] == (f"user-{i}" if i % 5 else "Invalid token 401")
    assert all(h.get("x-service-key") == "k1" and h.get("x-trace") == "t" for h in seen_headers)


def test_http_json_retries_once_on_transport_errors(make_extensions) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens: connection refused twice
    ext = make_extensions(HTTP_SCRIPT, {"KURA_EXTENSION_HTTP_CLIENT_AUTH_BASE_URL": f"http://127.0.0.1:{port}"})
    started = time.monotonic()
    with pytest.raises(Unauthenticated, match="Authentication failed"):
        ext.check(http_ctx())
    assert time.monotonic() - started >= 0.1


def test_http_json_time_is_not_counted_against_the_hook_deadline(make_extensions, auth_service) -> None:
    service = auth_service(lambda *a: (time.sleep(0.15), (200, {"active": True, "sub": "slow"}))[1])
    ext = make_extensions(HTTP_SCRIPT, {"KURA_EXTENSION_HTTP_CLIENT_AUTH_BASE_URL": service.url}, timeout_ms=25)
    assert ext.check(http_ctx()).id == "slow"


def test_http_json_request_timeout_and_non_json_body(make_extensions, auth_service) -> None:
    service = auth_service(lambda m, p, h, b: (time.sleep(0.5), (200, {}))[1] if p.startswith("/slow")
                           else (200, b"not json"))
    ext = make_extensions("""
function authenticate(ctx)
  local ok, err = pcall(kura.http_json, "auth", { path = "/slow" })
  local r = kura.http_json("auth", { path = "/text" })
  return { principal = { id = tostring(ok) .. ":" .. tostring(r.body) .. ":" .. r.status, kind = "k" } }
end""", {"KURA_EXTENSION_HTTP_CLIENT_AUTH_BASE_URL": service.url,
         "KURA_EXTENSION_HTTP_CLIENT_AUTH_REQUEST_TIMEOUT_MS": "100"})
    assert ext.check(http_ctx()).id == "false:nil:200"
