"""One sandboxed Lua 5.4 state (lupa), its CPU-time deadline and its memory limit.

Sandbox: the script sees the Lua base library minus everything that reaches
the host or bytecode: no ``os``, ``io``, ``debug``, ``package``/``require``,
``dofile``/``loadfile``, ``collectgarbage``, ``string.dump`` or lupa's
``python`` table; ``load`` compiles text only; the string metatable is
hidden. No Python object is reachable from Lua: the ``kura.*`` functions are
Lua closures over host callables held only as upvalues (and ``debug`` is
gone), host results are converted to plain Lua tables, and host exceptions are
turned into Lua string errors (lupa would otherwise hand the exception object
to ``pcall``).

Deadline: a count hook (installed with ``debug.sethook`` before ``debug`` is
removed, and on every coroutine the script creates) asks Python every
``CHECK_EVERY`` VM instructions whether the call has used up its CPU time and
raises a Lua error if so. ``pcall``/``xpcall``/``coroutine.resume`` re-raise
that error so a script cannot swallow it. The clock is the CPU time of the
thread running the call (``time.thread_time``): a call is charged for its own
execution only, never for other requests that ran meanwhile, nor for time
blocked in ``kura.http_json`` (bounded by the HTTP client's timeouts and the
per-call I/O budget instead). A call stuck inside one C function
(``string.find`` on a backtracking pattern) never reaches the count hook: the
thread that waits for it abandons it (``runner.py``).

Memory: lupa's allocator enforces ``limit_bytes`` on this state, but only
while Lua code runs. lupa pushes Python values into Lua outside a protected
call, where an allocation failure is a Lua panic that aborts the whole
process; and inside a host function a failure would unwind through Python
frames. So the limit is armed by the Lua entry point itself (``invoke``, the
only way Python calls into the state) and lifted before it returns, and every
host function lifts it while Python converts its arguments and result. An
allocation past the limit then always fails inside Lua, as a catchable
"not enough memory" error.

A state is used by one thread at a time (see ``runner.py``).
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

# VM instructions between deadline checks: about 0.5 ms of Lua. Each check
# takes the GIL, which a busy worker may hold for up to its switch interval,
# so checking more often would slow a hook down without making it fairer.
CHECK_EVERY = 100_000
TIMEOUT_MESSAGE = "kura: hook deadline exceeded"
HOOK_NAMES = ("authenticate", "authorize", "response_headers")
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_RESULT_CHARS = 1024 * 1024  # all strings of one hook result together

_PRELUDE = r"""
local check_deadline, py_log, checks, arm, lift = ...
local error, type, select, tostring = error, type, select, tostring
local rawpcall, rawxpcall, rawload = pcall, xpcall, load
local co_create, co_resume = coroutine.create, coroutine.resume
local sethook = debug.sethook
local TIMEOUT = "__TIMEOUT__"

local function hook()
  if check_deadline() then error(TIMEOUT, 0) end
end
sethook(hook, "", checks)

-- A script must not be able to swallow the deadline error, nor go on with the
-- memory limit lifted after an error inside a host function.
local function rethrow(ok, ...)
  if not ok then
    if check_deadline() then error(TIMEOUT, 0) end
    arm()
  end
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
    arm()
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
  lift()
  py_log(table.concat(parts, "\t"))
  arm()
end

os, io, debug, package, require, dofile, loadfile, collectgarbage, python = nil
string.dump = nil
getmetatable("").__metatable = false

-- The only entry point from Python: the memory limit holds while f runs and
-- is lifted again before anything is handed back (see the module docstring).
local function invoke(f, a, b)
  arm()
  local ok, value = rawpcall(f, a, b)
  lift()
  return ok, value
end

-- Host functions: Python callables stay upvalues of these closures. Python is
-- called with the limit lifted and answers (true, {value}) or (false, {message}).
local function answer(ok, box)
  arm()
  if not ok then error(box[1], 3) end
  return box[1]
end
return function(py_sign, py_jwt, py_http, py_env)
  kura = {
    sign_hmac_base64 = function(id, payload) lift(); return answer(py_sign(id, payload)) end,
    jwt_verify = function(id, token) lift(); return answer(py_jwt(id, token)) end,
    http_json = function(id, request) lift(); return answer(py_http(id, request)) end,
    env = function(key) lift(); return answer(py_env(key)) end,
  }
  local function loader(script)
    local fn, err = rawload(script[1], script[2], "t")
    if fn == nil then error(err, 0) end
    fn()
    local found = {}
    for _, name in ipairs({"authenticate", "authorize", "response_headers"}) do
      found[name] = type(_G[name]) == "function"
    end
    return found
  end
  return invoke, loader
end
""".replace("__TIMEOUT__", TIMEOUT_MESSAGE)

_LINE = re.compile(r':(\d+):')


class Deadline:
    """The current call's CPU-time deadline (of the thread running it) and I/O budget."""

    def __init__(self) -> None:
        self._deadline = float("inf")
        self.expired = False
        self.cancelled = False
        self.io_remaining_s = 0.0

    def start(self, timeout_s: float, io_budget_s: float) -> None:
        self._deadline = time.thread_time() + timeout_s
        self.expired = False
        self.io_remaining_s = io_budget_s

    def stop(self) -> None:
        self._deadline = float("inf")

    def cancel(self) -> None:
        """The caller gave up on this call (any thread): stop at the next check."""
        self.cancelled = True

    def check(self) -> bool:
        """Called from the Lua count hook: True once the call is past its deadline."""
        if self.expired:
            return True
        if self.cancelled or time.thread_time() > self._deadline:
            self.expired = True
            return True
        return False

    @contextmanager
    def host_io(self) -> Iterator[None]:
        """Spend the I/O budget while a host function blocks on I/O (no CPU is charged)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.io_remaining_s -= time.monotonic() - started


class LuaSandbox:
    """A loaded script in its own sandboxed Lua state.

    ``limit_bytes`` (total bytes of the state) applies while Lua code runs;
    None means no limit. ``on_caller(fn)`` runs ``fn`` on the thread that is
    waiting for the current call (``kura.http_json`` does its I/O there); by
    default it runs ``fn`` in place.
    """

    def __init__(self, source: str, chunkname: str, host: Any, *, limit_bytes: int | None,
                 load_timeout_s: float) -> None:
        self.deadline = Deadline()
        self.poisoned = False
        self.io_calls = 0  # kura.http_json calls of the current call
        self.limit_bytes = limit_bytes
        self.on_caller: Callable[[Callable[[], Any]], Any] = _run_in_place
        self.lua = lua54.LuaRuntime(
            register_eval=False, register_builtins=False, unpack_returned_tuples=True,
            attribute_handlers=(_deny_attribute, _deny_attribute_set), max_memory=0)
        install = self.lua.execute(_PRELUDE, self.deadline.check, _script_print, CHECK_EVERY,
                                   self._arm, self._lift)
        bound = host.bind(self)
        self._invoke, loader = install(bound.sign_hmac_base64, bound.jwt_verify, bound.http_json, bound.env)
        self.deadline.start(load_timeout_s, 0.0)
        try:
            found = self._run("load", loader, self.lua.table_from([source, "=" + chunkname]))
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
        first, second = (to_lua(self.lua, a) for a in (*args, None, None)[:2])
        self.io_calls = 0
        self.deadline.start(timeout_s, io_budget_s)
        try:
            result = self._run(hook, fn, first, second)
        finally:
            self.deadline.stop()
        return from_lua(result)

    def _run(self, what: str, fn: Any, first: Any = None, second: Any = None) -> Any:
        try:
            ok, value = self._invoke(fn, first, second)
        except lua54.LuaError as exc:  # in invoke itself: out of memory or the deadline
            self.poisoned = True
            if self.deadline.expired:
                raise HookFailed(what, "timeout") from exc
            raise HookFailed(what, "memory_limit", retryable=self.io_calls == 0) from exc
        if ok:
            return value
        if self.deadline.expired:
            # The script may have been interrupted half-way through updating
            # its own globals: never reuse this state.
            self.poisoned = True
            raise HookFailed(what, "timeout")
        message = value if isinstance(value, str) else ""
        if message == "not enough memory":
            self.poisoned = True
            raise HookFailed(what, "memory_limit", retryable=self.io_calls == 0)
        raise HookFailed(what, message.split("\n", 1)[0][:300] if what == "load" else "lua_error",
                         _line(message))

    # -- memory ---------------------------------------------------------------
    def memory_used(self) -> int:
        """Bytes the state holds (lupa's count of what Lua allocated)."""
        lua = self.lua  # None once closed (another thread may be asking)
        return int(lua.get_memory_used(total=True)) if lua is not None else 0

    def collect_garbage(self) -> None:
        self.lua.gccollect()

    def close(self) -> None:
        """Drop the Lua state now; its memory goes back to malloc."""
        self._globals = None
        self._invoke = None
        self.lua = None  # the runtime's last reference: lupa closes the state

    def _arm(self) -> None:
        if self.limit_bytes is not None:
            # lupa reads 0 as "no limit"
            self.lua.set_max_memory(max(1, self.limit_bytes), total=True)

    def _lift(self) -> None:
        self.lua.set_max_memory(0)


def _run_in_place(fn: Callable[[], Any]) -> Any:
    return fn()


def to_lua(lua: Any, value: Any) -> Any:
    """Plain Python data → Lua values (tables are built fresh, nothing Python-backed)."""
    if isinstance(value, (dict, list, tuple)):
        return lua.table_from(value, recursive=True)
    return value


def from_lua(value: Any) -> Any:
    """Lua values → plain Python data; functions, userdata and threads are rejected."""
    budget = [MAX_NODES, MAX_RESULT_CHARS]
    return _from_lua(value, 0, budget)


def _from_lua(value: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise HookFailed("result", "value too large or too deep")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        budget[1] -= len(value)
        if budget[1] < 0:
            raise HookFailed("result", "value too large or too deep")
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return value
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
        key = str(k)
        budget[1] -= len(key)
        out[key] = _from_lua(v, depth + 1, budget)
    if budget[1] < 0:
        raise HookFailed("result", "value too large or too deep")
    return out


def _deny_attribute(obj: Any, name: Any) -> Any:
    raise AttributeError("attribute access is not allowed in extension scripts")


def _deny_attribute_set(obj: Any, name: Any, value: Any) -> None:
    raise AttributeError("attribute access is not allowed in extension scripts")


def _script_print(message: str) -> None:
    log.debug("event=extension_script_print message=%s", str(message)[:500])


def _line(message: str) -> int | None:
    match = _LINE.search(message.split("\n", 1)[0])
    return int(match.group(1)) if match else None
