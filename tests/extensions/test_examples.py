"""The example scripts in examples/hooks, and a script shaped like Tuist's tuist.lua."""
from __future__ import annotations

import base64
import time

import jwt
import pytest

from app.errors import BadRequest, Forbidden, Unauthenticated
from app.extensions.errors import ExtensionUnavailable
from tests.extensions.conftest import EXAMPLES, http_ctx


def test_static_tokens(make_extensions) -> None:
    ext = make_extensions(EXAMPLES / "static_tokens.lua", {
        "KURA_EXTENSION_STATIC_READ_TOKENS": "ro-1, ro-2", "KURA_EXTENSION_STATIC_WRITE_TOKENS": "rw-1"})
    read, write = http_ctx, lambda **kw: http_ctx(operation="artifact.write", method="POST", **kw)
    assert ext.check(read(headers={"authorization": "Bearer ro-2"})).attributes == {"access": "read"}
    assert ext.check(write(headers={"authorization": "Bearer rw-1"})).id == "static-write"
    with pytest.raises(Forbidden, match="read-only"):
        ext.check(write(headers={"authorization": "Bearer ro-1"}))
    with pytest.raises(Unauthenticated, match="Invalid token"):
        ext.check(read(headers={"authorization": "Bearer nope"}))
    with pytest.raises(Unauthenticated, match="Missing bearer"):
        ext.check(read(headers={}))


def test_jwt_namespaces(make_extensions) -> None:
    secret = "namespace-grants-secret-namespace-grants-secret"
    ext = make_extensions(EXAMPLES / "jwt_namespaces.lua", {
        "KURA_EXTENSION_JWT_VERIFIER_PRIMARY_SECRET": secret})
    now = int(time.time())
    token = jwt.encode({"sub": "ci", "iat": now, "exp": now + 300,
                        "grants": {"read": ["android"], "write": ["ios"]}}, secret, algorithm="HS256")
    auth = {"authorization": f"Bearer {token}"}
    assert ext.check(http_ctx(namespace_id="ios", operation="artifact.write", headers=auth)).id == "ci"
    assert ext.check(http_ctx(namespace_id="ios", headers=auth)).id == "ci"
    assert ext.check(http_ctx(namespace_id="android", operation="artifact.inspect", headers=auth)).id == "ci"
    with pytest.raises(Forbidden, match="android"):
        ext.check(http_ctx(namespace_id="android", operation="artifact.write", headers=auth))
    with pytest.raises(Forbidden, match="web"):
        ext.check(http_ctx(namespace_id="web", headers=auth))
    with pytest.raises(Unauthenticated):
        ext.check(http_ctx(headers={"authorization": "Bearer forged.token.value"}))


def test_tenant_routing(make_extensions) -> None:
    ext = make_extensions(EXAMPLES / "tenant_routing.lua", tenant_id="acme")
    assert ext.check(http_ctx(tenant_id="ACME")) is None
    with pytest.raises(Forbidden, match="globex"):
        ext.check(http_ctx(tenant_id="globex"))
    with pytest.raises(BadRequest, match="Missing tenant_id"):
        ext.check(http_ctx(tenant_id=None))
    assert ext.check(http_ctx(transport="grpc", tenant_id=None, route="reapi.cas.find_missing")) is None


# Written against the same API surface tuist.lua uses (pcall around kura.jwt_verify,
# `type(kura.env) == "function"`, http_json to an introspection endpoint, top-level
# deny ttl_seconds, the module-cache signature with a base64 signer secret).
TUIST_SHAPED = """
local function env_value(key)
  if type(kura.env) ~= "function" then return nil end
  return kura.env(key)
end
local function bearer(headers)
  local a = headers.authorization or headers.Authorization
  if a == nil or a == "" then return nil end
  return string.gsub(a, "^Bearer%s+", "")
end
function authenticate(ctx)
  local token = bearer(ctx.headers)
  if token == nil then return { deny = { status = 401, message = "Missing Authorization header" }, ttl_seconds = 3 } end
  if string.lower(ctx.tenant_id or "") ~= string.lower(ctx.server_tenant_id) then
    return { deny = { status = 403, message = "Forbidden: tenant routed elsewhere" }, ttl_seconds = 3 }
  end
  local ok, claims = pcall(function() return kura.jwt_verify("tuist", token) end)
  if ok then
    return { principal = { id = claims.sub, kind = "subject", attributes = { projects = claims.projects } }, ttl_seconds = 60 }
  end
  local response = kura.http_json("tuist", { method = "POST", path = "/oauth2/introspect",
    body = { client_id = env_value("KURA_EXTENSION_TUIST_INTROSPECT_CLIENT_ID"), token = token } })
  if response.status == 200 and response.body and response.body.active == true then
    return { principal = { id = response.body.sub, kind = "subject", attributes = { projects = response.body.projects } }, ttl_seconds = 60 }
  end
  return { deny = { status = 503, message = "Authentication backend unavailable" }, ttl_seconds = 3 }
end
function authorize(ctx, principal)
  local target = string.lower(ctx.tenant_id) .. "/" .. string.lower(ctx.namespace_id or "")
  for _, p in ipairs(principal.attributes.projects or {}) do
    if p == target then return { allow = true, ttl_seconds = 60 } end
  end
  return { deny = { status = 403, message = "Forbidden: project '" .. target .. "' is not granted" }, ttl_seconds = 3 }
end
function response_headers(ctx, principal)
  if env_value("KURA_EXTENSION_SIGNER_TUIST_LICENSE_SECRET") == nil then return {} end
  if ctx.route ~= "/api/cache/module/{id}" or string.upper(ctx.method or "") ~= "GET" then return {} end
  if ctx.status_code == nil or ctx.status_code >= 400 then return {} end
  local hash = ctx.artifact_hash or (ctx.query and ctx.query.hash)
  if hash == nil then return {} end
  return { sign = { header = "x-tuist-signature", signer = "tuist_license", payload = hash } }
end
"""


def test_tuist_shaped_script(make_extensions, auth_service) -> None:
    def introspect(method, path, headers, body):
        if body.get("token") == "opaque-1" and body.get("client_id") == "kura-client":
            return 200, {"active": True, "sub": "acct", "projects": ["acme/ios"]}
        return 500, {"error": "down"}

    service = auth_service(introspect)
    secret = "tuist-guardian-secret-tuist-guardian-secret"
    ext = make_extensions(TUIST_SHAPED, {
        "KURA_EXTENSION_HTTP_CLIENT_TUIST_BASE_URL": service.url,
        "KURA_EXTENSION_JWT_VERIFIER_TUIST_SECRET": secret,
        "KURA_EXTENSION_TUIST_INTROSPECT_CLIENT_ID": "kura-client",
        "KURA_EXTENSION_SIGNER_TUIST_LICENSE_SECRET": base64.b64encode(b"license-key").decode(),
    }, tenant_id="acme")
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60, "projects": ["acme/ios"]}, secret)
    assert ext.check(http_ctx(headers={"authorization": f"Bearer {token}"})).id == "u"
    assert ext.check(http_ctx(headers={"authorization": "Bearer opaque-1"})).id == "acct"
    assert len(service.calls) == 1
    with pytest.raises(Forbidden, match="acme/android"):
        ext.check(http_ctx(namespace_id="android", headers={"authorization": "Bearer opaque-1"}))
    with pytest.raises(ExtensionUnavailable):
        ext.check(http_ctx(headers={"authorization": "Bearer opaque-2"}))
    with pytest.raises(Forbidden, match="routed elsewhere"):
        ext.check(http_ctx(tenant_id="globex", headers={"authorization": "Bearer opaque-1"}))
    signed = ext.response_headers(http_ctx(route="/api/cache/module/{id}", query={"hash": "h"}), None, 200)
    assert set(signed) == {"x-tuist-signature"}
