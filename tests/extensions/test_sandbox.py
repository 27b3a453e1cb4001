"""Escape attempts from a hook are refused; no Python object is reachable from Lua."""
from __future__ import annotations

import pytest

from app.errors import Forbidden
from tests.extensions.conftest import http_ctx

PROBES = {
    "os.execute": "return os.execute('id')",
    "os via _G": "return _G.os.execute('id')",
    "io.open": "return io.open('/etc/passwd')",
    "require": "return require('os')",
    "package.loadlib": "return package.loadlib('libc.so.6', 'system')",
    "dofile": "return dofile('/etc/passwd')",
    "loadfile": "return loadfile('/etc/passwd')",
    "string.dump": "return string.dump(function() end)",
    "binary load": "return load(string.char(27) .. 'Lua', 'x', 'b')()",
    "binary load default mode": "return load('\\27Lua\\84\\0')()",
    "debug.getregistry": "return debug.getregistry()",
    "debug via upvalue": "return debug.getupvalue(kura.env, 1)",
    "collectgarbage": "return collectgarbage('collect')",
    "python table": "return python.eval('1')",
    "python builtins": "return python.builtins.open('/etc/passwd')",
    "string metatable": "local mt = getmetatable(''); return mt.__index",
    "host function attribute": "return kura.env.__globals__",
    "host exception object": "local ok, e = pcall(kura.jwt_verify, 'nope', 'x'); return e.__class__",
    "huge allocation": "return string.rep('x', 1024 * 1024 * 1024)",
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_escape_is_refused(make_extensions, name) -> None:
    ext = make_extensions(f"""
function authenticate(ctx)
  local ok, result = pcall(function() {PROBES[name]} end)
  if ok and result ~= nil and result ~= false then
    return {{ principal = {{ id = "escaped:" .. type(result), kind = "bad" }} }}
  end
  return {{ deny = {{ status = 403, message = "refused" }} }}
end""", timeout_ms=200)
    # The probe fails inside the script's pcall, so the script itself answers: neither an
    # escape (a principal) nor a crashed hook (401 Authentication failed).
    with pytest.raises(Forbidden, match="^refused$"):
        ext.check(http_ctx())


def test_globals_contain_no_python_objects(make_extensions) -> None:
    ext = make_extensions("""
local seen = {}
local function walk(value, depth)
  local t = type(value)
  if t == "userdata" then return 1 end
  if t ~= "table" or seen[value] or depth > 6 then return 0 end
  seen[value] = true
  local count = 0
  for k, v in pairs(value) do count = count + walk(k, depth + 1) + walk(v, depth + 1) end
  return count
end
function authenticate(ctx)
  local claims = kura.env("KURA_EXTENSION_X")
  return { principal = { id = tostring(walk(_G, 0) + walk(ctx, 0)), kind = tostring(claims) } }
end""", {"KURA_EXTENSION_X": "v"})
    principal = ext.check(http_ctx())
    assert principal.id == "0" and principal.kind == "v"


def test_load_text_is_allowed_but_sandboxed(make_extensions) -> None:
    ext = make_extensions("""
function authenticate(ctx)
  local f = load("return os == nil and io == nil and debug == nil")
  return { principal = { id = tostring(f()), kind = "k" } }
end""")
    assert ext.check(http_ctx()).id == "true"


def test_kura_env_only_exposes_extension_variables(make_extensions) -> None:
    ext = make_extensions("""
function authenticate(ctx)
  return { principal = { id = tostring(kura.env("PATH")) .. "/" .. tostring(kura.env("KURA_EXTENSION_A")), kind = "k" } }
end""", {"KURA_EXTENSION_A": "1"})
    assert ext.check(http_ctx()).id == "nil/1"
