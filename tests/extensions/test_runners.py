"""Hook calls on OS threads of their own: stuck calls are abandoned, hooks are charged
their own CPU time, and the Lua memory of a process has one budget."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from app.errors import Unauthenticated
from tests.extensions.conftest import CPU_HOOK, lua_iterations_for, http_ctx

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024

# About a second of CPU inside one C call, where the instruction-count hook never runs.
STUCK_FOR_A_WHILE = 'local s = string.rep("a", 160); s:find(".-.-.-b")'
SCRIPT = f"""
function authenticate(ctx)
  local token = ctx.headers.authorization
  if token == "Bearer stuck" then {STUCK_FOR_A_WHILE} end
  if token == "Bearer loop" then while true do end end
  return {{ principal = {{ id = "ok", kind = "user" }}, ttl_seconds = 0 }}
end"""
STUCK = http_ctx(headers={"authorization": "Bearer stuck"})


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_call_stuck_in_a_c_function_fails_closed_at_its_timeout(make_extensions) -> None:
    ext = make_extensions(SCRIPT, timeout_ms=25)
    started = time.monotonic()
    with pytest.raises(Unauthenticated, match="^Authentication failed$"):
        ext.check(STUCK)
    assert time.monotonic() - started < 0.5
    assert ext._pool.abandoned == 1
    # Other calls go on meanwhile, on other states.
    assert [ext.check(http_ctx()).id for _ in range(20)] == ["ok"] * 20
    # Once the C call returns, its thread closes the state instead of serving again.
    _wait_for(lambda: ext._pool.abandoned == 0)
    assert ext.check(http_ctx()).id == "ok"


def test_a_looping_hook_is_cut_by_its_own_thread_not_abandoned(make_extensions) -> None:
    ext = make_extensions(SCRIPT, timeout_ms=25)
    with pytest.raises(Unauthenticated):
        ext.check(http_ctx(headers={"authorization": "Bearer loop"}))
    assert ext._pool.abandoned == 0


def test_at_the_abandoned_bound_hooks_fail_at_once_and_a_restart_is_asked_for(make_extensions) -> None:
    restarts: list[int] = []
    ext = make_extensions(SCRIPT, {"KURA_EXTENSION_MAX_ABANDONED_HOOKS": "1"},
                          on_abandoned_limit=lambda: restarts.append(1))
    with pytest.raises(Unauthenticated):
        ext.check(STUCK)
    assert restarts == [1]
    started = time.monotonic()
    with pytest.raises(Unauthenticated):  # no thread is started while the stuck one lives
        ext.check(http_ctx())
    assert time.monotonic() - started < 0.1
    _wait_for(lambda: ext._pool.abandoned == 0)
    assert ext.check(http_ctx()).id == "ok"
    assert restarts == [1]


GEVENT_LOAD = r"""
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from app.extensions import Extensions, HookContext
from app.settings import Settings
ext = Extensions.from_settings(Settings(extension_enabled=True, extension_script_path=sys.argv[1],
                                        extension_hook_timeout_ms=25))
def busy():  # the worker's other requests: Python CPU, yielding every 2 ms
    end = time.monotonic() + 1
    while time.monotonic() < end:
        mark = time.monotonic()
        while time.monotonic() - mark < 0.002:
            pass
        gevent.sleep(0)
def call(i):
    ctx = HookContext("http", "/r", "GET", "artifact.read", "acme", "acme", "ios", "xcode", None, None,
                      {"authorization": f"Bearer {i}"}, {})
    try:
        return ext.check(ctx) is not None
    except Exception:
        return False
hogs = [gevent.spawn(busy) for _ in range(4)]
calls = [gevent.spawn(call, i) for i in range(200)]
gevent.joinall(calls + hogs)
print(sum(g.value for g in calls), len(calls))
"""


def test_hooks_are_charged_their_own_cpu_time_under_gevent(tmp_path: Path) -> None:
    """200 concurrent 3 ms hooks in one gevent process beside busy greenlets: all allowed."""
    script = tmp_path / "hooks.lua"
    script.write_text(CPU_HOOK.format(iterations=lua_iterations_for(0.003)))
    runner = tmp_path / "load.py"
    runner.write_text(GEVENT_LOAD)
    out = subprocess.run([sys.executable, str(runner), str(script)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["200", "200"], out.stderr[-2000:]


BIG = """
function authenticate(ctx)
  local token = ctx.headers.authorization
  if token == "Bearer io" then
    kura.http_json("auth", { path = "/wait" })
    return { principal = { id = "io", kind = "user" }, ttl_seconds = 0 }
  end
  if token == "Bearer io-then-big" then kura.http_json("auth", { path = "/quick" }) end
  local s = string.rep("x", 4 * 1024 * 1024) .. token
  local n = 0
  for i = 1, 200000 do n = n + 1 end
  return { principal = { id = "big" .. #s, kind = "user" }, ttl_seconds = 0 }
end"""
# 16 MiB for 4 states: each call is guaranteed 2 MiB, one alone may use about 10 MiB.
BUDGET_ENV = {"KURA_EXTENSION_MEMORY_LIMIT_BYTES": str(16 * MIB), "KURA_EXTENSION_RUNTIME_POOL_SIZE": "4"}


def test_the_lua_memory_of_a_process_stays_within_its_total(make_extensions) -> None:
    ext = make_extensions(BIG, BUDGET_ENV, timeout_ms=2000)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], ext._pool.lua_memory_used())
            time.sleep(0.001)

    outcomes: list[str] = []

    def client(index: int) -> None:
        for n in range(3):
            try:
                outcomes.append(ext.check(http_ctx(headers={"authorization": f"Bearer {index}-{n}"})).id)
            except Unauthenticated:
                outcomes.append("refused")

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    done.set()
    sampler.join()
    assert len(outcomes) == 36 and set(outcomes) <= {"refused"} | {f"big{4 * MIB + len(f'Bearer {i}-{n}')}"
                                                                   for i in range(12) for n in range(3)}
    assert outcomes.count("refused") < 36
    assert 4 * MIB < peak[0] <= 16 * MIB
    # Calls that grew their state had it collected: idle states hold little.
    assert ext._pool.lua_memory_used() < 2 * MIB


def test_a_pure_hook_short_of_memory_is_retried_alone_once_memory_is_free(make_extensions, auth_service) -> None:
    gate = threading.Event()

    def handler(method, path, headers, body):
        if path == "/wait":
            gate.wait(10)
        return 200, {}

    service = auth_service(handler)
    ext = make_extensions(BIG, {**BUDGET_ENV, "KURA_EXTENSION_HTTP_CLIENT_AUTH_BASE_URL": service.url},
                          timeout_ms=2000)
    results: dict[str, str] = {}

    def check(token: str) -> None:
        try:
            results[token] = ext.check(http_ctx(headers={"authorization": f"Bearer {token}"})).id
        except Unauthenticated:
            results[token] = "refused"

    holder = threading.Thread(target=check, args=("io",))  # first: gets most of the memory, then waits on I/O
    holder.start()
    _wait_for(lambda: ("GET", "/wait") in service.calls)
    big = threading.Thread(target=check, args=("big",))
    big.start()
    time.sleep(0.3)
    assert "big" not in results  # out of memory at first; waiting for the holder to finish
    # A hook that already did I/O is not run twice: it fails closed.
    check("io-then-big")
    assert results["io-then-big"] == "refused"
    assert service.calls.count(("GET", "/quick")) == 1
    gate.set()
    holder.join()
    big.join()
    assert results == {"io": "io", "big": f"big{4 * MIB + len('Bearer big')}", "io-then-big": "refused"}


SHORT_OF_MEMORY = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from app.extensions import Extensions, HookContext
from app.settings import Settings

BODY = json.dumps({"items": ["x" * 100] * 20000}).encode()  # 2.2 MB of JSON
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
ext = Extensions.from_settings(Settings(extension_enabled=True, extension_script_path=sys.argv[1], kura_env={
    "KURA_EXTENSION_HTTP_CLIENT_AUTH_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}",
    "KURA_EXTENSION_MEMORY_LIMIT_BYTES": str(1024 * 1024), "KURA_EXTENSION_RUNTIME_POOL_SIZE": "1"}))
for token in ("http", "header"):
    headers = {"authorization": token, "x-big": "y" * 2 * 1024 * 1024}
    ctx = HookContext("http", "/r", "GET", "artifact.read", "acme", "acme", None, None, None, None, headers, {})
    try:
        print(token, ext.check(ctx).id)
    except Exception as exc:
        print(token, type(exc).__name__)
"""


def test_values_bigger_than_the_memory_left_never_wedge_the_process(tmp_path: Path) -> None:
    """A 2 MB kura.http_json answer or request header for a 1 MiB Lua budget: Python
    converts them into Lua outside any protected Lua call, where running out of memory
    would be a Lua panic (or a jump through Python frames). Neither fits: the hook fails
    closed, and the process goes on."""
    script = tmp_path / "hooks.lua"
    script.write_text("""
function authenticate(ctx)
  if ctx.headers.authorization == "http" then
    local r = kura.http_json("auth", { path = "/big" })
    return { principal = { id = tostring(#r.body.items), kind = "user" }, ttl_seconds = 0 }
  end
  return { principal = { id = "header" .. #ctx.headers["x-big"], kind = "user" }, ttl_seconds = 0 }
end""")
    probe = tmp_path / "probe.py"
    probe.write_text(SHORT_OF_MEMORY)
    out = subprocess.run([sys.executable, str(probe), str(script)], cwd=REPO, capture_output=True, text=True,
                         timeout=30, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["http Unauthenticated", "header Unauthenticated"]
