"""One sandboxed Lua 5.4 state (lupa) with a per-call deadline.

Sandbox: the script sees the Lua base library minus everything that reaches
the host or bytecode: no ``os``, ``io``, ``debug``, ``package``/``require``,
``dofile``/``loadfile``, ``collectgarbage``, ``string.dump`` or lupa's
``python`` table; ``load`` compiles text only; the string metatable is
hidden. No Python object is reachable from Lua: the ``kura.*`` functions are
Lua closures over host callables held only as upvalues (and ``debug`` is
gone), host results are converted to plain Lua tables, and host exceptions are
turned into Lua string errors (lupa would otherwise hand the exception object
to ``pcall``). Memory is capped per state (``max_memory``).

Deadline: a count hook (installed with ``debug.sethook`` before ``debug`` is
removed, and on every coroutine the script creates) asks Python every
``CHECK_EVERY`` VM instructions whether the call is past its deadline and
raises a Lua error if so. ``pcall``/``xpcall``/``coroutine.resume`` re-raise
that error so a script cannot swallow it. Time spent inside host functions
(``kura.http_json``) does not count against the hook deadline: it is bounded by
the HTTP client's own timeouts and by the per-call I/O budget instead.

A state is used by one caller at a time (see ``pool.py``): a hook may yield
inside ``kura.http_json`` (gevent) and lupa's own lock cannot tell greenlets
of one thread apart.
"""
from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from lupa import lua54

from app.extensions.errors import HookFailed

log = logging.getLogger("kura.extensions")

CHECK_EVERY = 10_000  # VM instructions between deadline checks (~0.1 ms of Lua)
TIMEOUT_MESSAGE = "kura: hook deadline exceeded"
HOOK_NAMES = ("authenticate", "authorize", "response_headers")
MAX_DEPTH = 32
MAX_NODES = 20_000

_PRELUDE = r"""
local check_deadline, py_log, checks = ...
local error, type, select, tostring = error, type, select, tostring
local rawpcall, rawxpcall, rawload = pcall, xpcall, load
local co_create, co_resume = coroutine.create, coroutine.resume
local sethook = debug.sethook
local TIMEOUT = "__TIMEOUT__"

local function hook()
  if check_deadline() then error(TIMEOUT, 0) end
end
sethook(hook, "", checks)

-- A script must not be able to swallow the deadline error.
local function rethrow(ok, ...)
  if not ok and check_deadline() then error(TIMEOUT, 0) end
  return ok, ...
end
pcall = function(f, ...) return rethrow(rawpcall(f, ...)) end
xpcall = function(f, handler, ...) return rethrow(rawxpcall(f, handler, ...)) end

local function new_coroutine(f)
  local co = co_create(f)
  sethook(co, hook, "", checks)  -- hooks are per coroutine in Lua 5.4
  return co
end
local function unwrap(ok, ...)
  if not ok then
    if check_deadline() then error(TIMEOUT, 0) end
    error((...), 0)
  end
  return ...
end
coroutine.create = new_coroutine
coroutine.resume = function(co, ...) return rethrow(co_resume(co, ...)) end
coroutine.wrap = function(f)
  local co = new_coroutine(f)
  return function(...) return unwrap(co_resume(co, ...)) end
end

-- load: text chunks only; a given env is honoured, otherwise the sandbox globals.
load = function(chunk, name, _mode, ...)
  if select("#", ...) > 0 then return rawload(chunk, name, "t", (...)) end
  return rawload(chunk, name, "t")
end

print = function(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  py_log(table.concat(parts, "\t"))
end

os, io, debug, package, require, dofile, loadfile, collectgarbage, python = nil
string.dump = nil
getmetatable("").__metatable = false

-- Host functions: Python callables stay upvalues of these closures.
local function host_result(ok, value)
  if not ok then error(value, 3) end
  return value
end
return function(py_sign, py_jwt, py_http, py_env)
  kura = {
    sign_hmac_base64 = function(id, payload) return host_result(py_sign(id, payload)) end,
    jwt_verify = function(id, token) return host_result(py_jwt(id, token)) end,
    http_json = function(id, request) return host_result(py_http(id, request)) end,
    env = function(key) return host_result(py_env(key)) end,
  }
  return function(source, chunkname)
    local fn, err = rawload(source, chunkname, "t")
    if fn == nil then error(err, 0) end
    fn()
    local found = {}
    for _, name in ipairs({"authenticate", "authorize", "response_headers"}) do
      found[name] = type(_G[name]) == "function"
    end
    return found
  end
end
""".replace("__TIMEOUT__", TIMEOUT_MESSAGE)

_LINE = re.compile(r':(\d+):')


class Deadline:
    """The current call's deadline; host I/O time is excluded (see ``host_io``)."""

    def __init__(self, yield_fn: Callable[[], None] | None) -> None:
        self._deadline = float("inf")
        self._yield = yield_fn
        self.expired = False
        self.io_remaining_s = 0.0

    def start(self, timeout_s: float, io_budget_s: float) -> None:
        self._deadline = time.monotonic() + timeout_s
        self.expired = False
        self.io_remaining_s = io_budget_s

    def stop(self) -> None:
        self._deadline = float("inf")

    def check(self) -> bool:
        """Called from the Lua count hook: True once the call is past its deadline."""
        if self.expired:
            return True
        if time.monotonic() > self._deadline:
            self.expired = True
            return True
        if self._yield is not None:
            # Under gevent a CPU-bound hook would starve every other greenlet of
            # the worker; let them run. Safe: this state is checked out by us only.
            self._yield()
        return False

    @contextmanager
    def host_io(self) -> Iterator[None]:
        """Pause the hook deadline while a host function blocks on I/O."""
        started = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - started
            self._deadline += spent
            self.io_remaining_s -= spent


class LuaSandbox:
    """A loaded script in its own sandboxed Lua state."""

    def __init__(self, source: str, chunkname: str, host: Any, *, memory_limit_bytes: int,
                 load_timeout_s: float, yield_fn: Callable[[], None] | None = None) -> None:
        self.deadline = Deadline(yield_fn)
        self.poisoned = False
        self.lua = lua54.LuaRuntime(
            register_eval=False, register_builtins=False, unpack_returned_tuples=True,
            attribute_handlers=(_deny_attribute, _deny_attribute_set), max_memory=memory_limit_bytes)
        install = self.lua.execute(_PRELUDE, self.deadline.check, _script_print, CHECK_EVERY)
        bound = host.bind(self)
        loader = install(bound.sign_hmac_base64, bound.jwt_verify, bound.http_json, bound.env)
        self.deadline.start(load_timeout_s, 0.0)
        try:
            found = loader(source, "=" + chunkname)
        except lua54.LuaError as exc:
            raise HookFailed("load", _describe(exc, self.deadline), _line(exc)) from None
        finally:
            self.deadline.stop()
        self.hooks = frozenset(name for name in HOOK_NAMES if found[name])
        self._globals = self.lua.globals()

    def has_hook(self, name: str) -> bool:
        return name in self.hooks

    def call(self, hook: str, args: tuple[Any, ...], timeout_s: float, io_budget_s: float) -> Any:
        """Run one hook with plain-data args; returns its result as plain Python data."""
        fn = self._globals[hook]
        if lua54.lua_type(fn) != "function":
            raise HookFailed(hook, "hook is no longer a function")
        lua_args = [to_lua(self.lua, a) for a in args]
        self.deadline.start(timeout_s, io_budget_s)
        try:
            result = fn(*lua_args)
        except lua54.LuaMemoryError:
            self.poisoned = True
            raise HookFailed(hook, "memory_limit") from None
        except lua54.LuaError as exc:
            if self.deadline.expired:
                # The script may have been interrupted half-way through updating
                # its own globals: never reuse this state.
                self.poisoned = True
                raise HookFailed(hook, "timeout") from None
            raise HookFailed(hook, "lua_error", _line(exc)) from None
        finally:
            self.deadline.stop()
        if isinstance(result, tuple):
            result = result[0] if result else None
        return from_lua(result)


def to_lua(lua: Any, value: Any) -> Any:
    """Plain Python data → Lua values (tables are built fresh, nothing Python-backed)."""
    if isinstance(value, (dict, list, tuple)):
        return lua.table_from(value, recursive=True)
    return value


def from_lua(value: Any) -> Any:
    """Lua values → plain Python data; functions, userdata and threads are rejected."""
    budget = [MAX_NODES]
    return _from_lua(value, 0, budget)


def _from_lua(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise HookFailed("result", "value too large or too deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    kind = lua54.lua_type(value)
    if kind != "table":
        raise HookFailed("result", f"unsupported Lua type {kind}")
    items = list(value.items())
    if items and all(isinstance(k, int) and not isinstance(k, bool) for k, _ in items):
        keys = sorted(k for k, _ in items)
        if keys == list(range(1, len(keys) + 1)):
            ordered = dict(items)
            return [_from_lua(ordered[i], depth + 1, budget) for i in keys]
    out: dict[str, Any] = {}
    for k, v in items:
        if isinstance(k, bytes):
            k = k.decode("utf-8", "replace")
        out[str(k)] = _from_lua(v, depth + 1, budget)
    return out


def _deny_attribute(obj: Any, name: Any) -> Any:
    raise AttributeError("attribute access is not allowed in extension scripts")


def _deny_attribute_set(obj: Any, name: Any, value: Any) -> None:
    raise AttributeError("attribute access is not allowed in extension scripts")


def _script_print(message: str) -> None:
    log.debug("event=extension_script_print message=%s", str(message)[:500])


def _line(exc: BaseException) -> int | None:
    match = _LINE.search(str(exc).split("\n", 1)[0])
    return int(match.group(1)) if match else None


def _describe(exc: BaseException, deadline: Deadline) -> str:
    if deadline.expired:
        return "timeout"
    first = str(exc).split("\n", 1)[0]
    return first[:300]
