"""Every hook outcome, failure mode and the response header signing."""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging

import pytest

from app.errors import BadRequest, BudgetExhausted, Forbidden, Unauthenticated
from app.extensions import Extensions, Principal
from app.extensions.errors import ExtensionDenied, ExtensionUnavailable
from app.settings import ConfigError, Settings
from tests.extensions.conftest import http_ctx


def test_disabled_returns_none() -> None:
    assert Extensions.from_settings(Settings()) is None


def test_principal_is_returned(make_extensions) -> None:
    ext = make_extensions("""
function authenticate(ctx)
  return { principal = { id = "u1", kind = "user", attributes = { team = "ios", n = 3 } } }
end""")
    assert ext.check(http_ctx()) == Principal("u1", "user", {"team": "ios", "n": 3})


def test_anonymous_and_missing_hooks(make_extensions) -> None:
    assert make_extensions("function authenticate(ctx) return { anonymous = true } end").check(http_ctx()) is None
    assert make_extensions("local x = 1").check(http_ctx()) is None  # no hooks: anonymous + allow


@pytest.mark.parametrize("status,error,retry", [
    (401, Unauthenticated, None), (403, Forbidden, None), (429, BudgetExhausted, 7),
    (503, ExtensionUnavailable, 7), (400, BadRequest, None), (402, ExtensionDenied, None)])
def test_deny_maps_to_typed_errors(make_extensions, status, error, retry) -> None:
    ext = make_extensions(f"""
function authenticate(ctx) return {{ deny = {{ status = {status}, message = "no way" }}, ttl_seconds = 7 }} end""")
    with pytest.raises(error) as info:
        ext.check(http_ctx())
    assert info.value.message == "no way"
    assert info.value.http_status == status
    if retry is not None:
        assert info.value.retry_after_s == retry


def test_authorize_outcomes(make_extensions) -> None:
    ext = make_extensions("""
function authenticate(ctx) return { principal = { id = "u1", kind = "user" } } end
function authorize(ctx, principal)
  assert(principal.id == "u1")
  if ctx.operation == "artifact.read" then return { allow = true } end
  if ctx.operation == "artifact.write" then return { allow = false } end
  return { deny = { status = 429, message = "slow down" } }
end""")
    assert ext.check(http_ctx()).id == "u1"
    with pytest.raises(Forbidden, match="^Forbidden$"):
        ext.check(http_ctx(operation="artifact.write"))
    with pytest.raises(BudgetExhausted, match="slow down"):
        ext.check(http_ctx(operation="namespace.delete"))


def test_authorize_receives_nil_for_anonymous(make_extensions) -> None:
    ext = make_extensions("""
function authorize(ctx, principal)
  if principal == nil then return { deny = { status = 401, message = "login first" } } end
  return { allow = true }
end""")
    with pytest.raises(Unauthenticated, match="login first"):
        ext.check(http_ctx())


@pytest.mark.parametrize("body", [
    'error("boom")', "return 42", "return { principal = { kind = 'x' } }",
    "return { deny = { status = 200, message = 'x' } }", "return { something = true }",
    "return { principal = { id = 'a', kind = 'b' }, ttl_seconds = -1 }"])
def test_failing_authenticate_fails_closed(make_extensions, body) -> None:
    ext = make_extensions(f"function authenticate(ctx) {body} end")
    with pytest.raises(Unauthenticated, match="^Authentication failed$"):
        ext.check(http_ctx())


def test_failing_authorize_fails_closed_and_can_fail_open(make_extensions) -> None:
    script = "function authorize(ctx, p) error('boom') end"
    with pytest.raises(Forbidden, match="^Forbidden$"):
        make_extensions(script).check(http_ctx())
    opened = make_extensions(script, {"KURA_EXTENSION_FAIL_CLOSED_AUTHORIZE": "false"})
    assert opened.check(http_ctx()) is None
    auth_open = make_extensions("function authenticate(ctx) error('x') end",
                                {"KURA_EXTENSION_FAIL_CLOSED_AUTHENTICATE": "false"})
    assert auth_open.check(http_ctx()) is None


def test_ctx_fields_reach_the_hook(make_extensions) -> None:
    ext = make_extensions("""
function authenticate(ctx)
  local parts = { ctx.transport, ctx.route, ctx.method, ctx.operation, ctx.server_tenant_id, ctx.tenant_id,
                  tostring(ctx.namespace_id), ctx.producer, ctx.artifact_key, tostring(ctx.artifact_hash),
                  ctx.headers["x-custom"], ctx.query.hash, tostring(ctx.status_code) }
  return { principal = { id = table.concat(parts, "|"), kind = "k" } }
end""")
    ctx = http_ctx(namespace_id="", headers={"x-custom": "v"}, query={"hash": "h1"})
    assert ext.check(ctx).id == ("http|/api/cache/cas/{id}|GET|artifact.read|acme|acme|nil|xcode|blob/1|nil|v|h1|nil")


def test_response_headers_plain_and_signed(make_extensions) -> None:
    key = b"super-secret-key-bytes"
    ext = make_extensions("""
function response_headers(ctx, principal)
  if ctx.status_code >= 400 then return {} end
  return {
    headers = { ["X-Principal"] = principal and principal.id or "anonymous" },
    sign = { header = "x-tuist-signature", signer = "tuist_license", payload = ctx.query.hash },
  }
end""", {"KURA_EXTENSION_SIGNER_TUIST_LICENSE_ALGORITHM": "hmac-sha256",
         "KURA_EXTENSION_SIGNER_TUIST_LICENSE_SECRET": base64.b64encode(key).decode()})
    ctx = http_ctx(route="/api/cache/module/{id}", query={"hash": "abc123"})
    headers = ext.response_headers(ctx, Principal("u1", "user", {}), 200)
    expected = base64.b64encode(hmac.new(key, b"abc123", hashlib.sha256).digest()).decode()
    assert headers == {"x-principal": "u1", "x-tuist-signature": expected}
    assert ext.response_headers(ctx, None, 404) == {}


def test_response_headers_fail_open_or_marked(make_extensions) -> None:
    script = "function response_headers(ctx, p) return { sign = { header = 'x-s', signer = 'missing', payload = 'p' } } end"
    assert make_extensions(script).response_headers(http_ctx(), None, 200) == {}
    marked = make_extensions(script, {"KURA_EXTENSION_FAIL_OPEN_RESPONSE_HEADERS": "false"})
    assert marked.response_headers(http_ctx(), None, 200) == {"x-kura-extension-error": "response_headers"}
    looping = make_extensions("function response_headers(ctx, p) while true do end end")
    assert looping.response_headers(http_ctx(), None, 200) == {}


def test_sign_hmac_base64_host_function(make_extensions) -> None:
    ext = make_extensions("""
function authenticate(ctx) return { principal = { id = kura.sign_hmac_base64("s1", "payload"), kind = "k" } } end""",
                          {"KURA_EXTENSION_SIGNER_S1_SECRET": base64.b64encode(b"k").decode()})
    assert ext.check(http_ctx()).id == base64.b64encode(hmac.new(b"k", b"payload", hashlib.sha256).digest()).decode()


@pytest.mark.parametrize("script", ["function authenticate(ctx", "error('at load')", "while true do end"])
def test_script_that_fails_to_load_is_a_config_error(make_extensions, script) -> None:
    with pytest.raises(ConfigError, match="KURA_EXTENSION_SCRIPT_PATH"):
        make_extensions(script, timeout_ms=5)


def test_bytecode_script_is_refused(make_extensions, tmp_path) -> None:
    path = tmp_path / "compiled.lua"
    path.write_bytes(b"\x1bLua\x54\x00garbage")
    with pytest.raises(ConfigError, match="KURA_EXTENSION_SCRIPT_PATH"):
        make_extensions(path)


@pytest.mark.parametrize("env,var", [
    ({"KURA_EXTENSION_SIGNER_X_SECRET": "not base64!"}, "KURA_EXTENSION_SIGNER_X_SECRET"),
    ({"KURA_EXTENSION_SIGNER_X_ALGORITHM": "rsa"}, "KURA_EXTENSION_SIGNER_X_ALGORITHM"),
    ({"KURA_EXTENSION_JWT_VERIFIER_P_ALGORITHM": "RS256", "KURA_EXTENSION_JWT_VERIFIER_P_SECRET": "s"},
     "KURA_EXTENSION_JWT_VERIFIER_P_ALGORITHM"),
    ({"KURA_EXTENSION_HTTP_CLIENT_A_BASE_URL": "ftp://x"}, "KURA_EXTENSION_HTTP_CLIENT_A_BASE_URL"),
    ({"KURA_EXTENSION_HTTP_CLIENT_A_BASE_URL": "http://x", "KURA_EXTENSION_HTTP_CLIENT_A_REQUEST_TIMEOUT_MS": "x"},
     "KURA_EXTENSION_HTTP_CLIENT_A_REQUEST_TIMEOUT_MS"),
    ({"KURA_EXTENSION_CACHE_MAX_ENTRIES": "0"}, "KURA_EXTENSION_CACHE_MAX_ENTRIES"),
    # Each Lua state of the pool needs 1 MiB of the process's Lua memory.
    ({"KURA_EXTENSION_MEMORY_LIMIT_BYTES": str(31 * 1024 * 1024)}, "KURA_EXTENSION_MEMORY_LIMIT_BYTES"),
    ({"KURA_EXTENSION_RUNTIME_POOL_SIZE": "8", "KURA_EXTENSION_MEMORY_LIMIT_BYTES": "x"},
     "KURA_EXTENSION_MEMORY_LIMIT_BYTES"),
    ({"KURA_EXTENSION_MAX_ABANDONED_HOOKS": "0"}, "KURA_EXTENSION_MAX_ABANDONED_HOOKS"),
])
def test_bad_extension_variables_name_the_variable(make_extensions, env, var) -> None:
    with pytest.raises(ConfigError, match=var):
        make_extensions("local x = 1", env)


@pytest.mark.parametrize("var", ["KURA_EXTENSION_SIGNER_EDGE_FOO", "KURA_EXTENSION_HTTP_CLIENT_A_TIMEOUT",
                                 "KURA_EXTENSION_JWT_VERIFIER_SECRET"])
def test_unknown_per_id_variable_is_a_warning_naming_it(make_extensions, caplog, var) -> None:
    key = base64.b64encode(b"k").decode()
    with caplog.at_level(logging.WARNING, logger="kura.extensions"):
        ext = make_extensions("local x = 1", {var: "x", "KURA_EXTENSION_SIGNER_EDGE_SECRET": key})
    unknown = [(r.levelno, r.getMessage()) for r in caplog.records
               if "event=extension_unknown_variable" in r.getMessage()]
    assert len(unknown) == 1 and unknown[0][0] == logging.WARNING and f"variable={var} " in unknown[0][1]
    assert set(ext.config.signers) == {"EDGE"}  # the known variables still apply
