"""Deadline enforcement, decision cache TTLs/keys/bounds, single-flight."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.errors import Forbidden, Unauthenticated
from tests.extensions.conftest import http_ctx

LOOPING = """
calls = 0
function authenticate(ctx)
  calls = calls + 1
  if ctx.headers.authorization == "Bearer loop" then while true do end end
  if ctx.headers.authorization == "Bearer sneaky" then
    while true do pcall(function() while true do end end) end
  end
  if ctx.headers.authorization == "Bearer coroutine" then
    local co = coroutine.wrap(function() while true do end end)
    while true do pcall(co) end
  end
  return { principal = { id = "ok", kind = "user" }, ttl_seconds = 0 }
end"""


@pytest.mark.parametrize("token", ["loop", "sneaky", "coroutine"])
def test_endless_loop_is_cut_at_the_deadline(make_extensions, token) -> None:
    ext = make_extensions(LOOPING, timeout_ms=25)
    started = time.monotonic()
    with pytest.raises(Unauthenticated, match="Authentication failed"):
        ext.check(http_ctx(headers={"authorization": f"Bearer {token}"}))
    assert time.monotonic() - started < 0.5
    assert ext.check(http_ctx()).id == "ok"  # the worker keeps serving


def test_looping_hook_does_not_stop_concurrent_calls(make_extensions) -> None:
    ext = make_extensions(LOOPING, timeout_ms=200)
    results: list[str] = []
    loop_done = threading.Event()

    def loop() -> None:
        with pytest.raises(Unauthenticated):
            ext.check(http_ctx(headers={"authorization": "Bearer loop"}))
        loop_done.set()

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.02)
    while not loop_done.is_set():
        results.append(ext.check(http_ctx()).id)
    thread.join()
    assert len(results) >= 5 and set(results) == {"ok"}


GEVENT_SCRIPT = r"""
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from app.extensions import Extensions, HookContext
from app.settings import Settings
ext = Extensions.from_settings(Settings(extension_enabled=True, extension_script_path=sys.argv[1],
                                        extension_hook_timeout_ms=300))
ticks = []
def ticker():
    while True:
        ticks.append(time.monotonic()); gevent.sleep(0.005)
def ctx(token):
    return HookContext("http", "/r", "GET", "artifact.read", "acme", "acme", "ios", "xcode", None, None,
                       {"authorization": "Bearer " + token}, {})
def looping():
    try: ext.check(ctx("loop")); return "allowed?!"
    except Exception as exc: return type(exc).__name__
t = gevent.spawn(ticker)
gevent.sleep(0.02)
started = time.monotonic()
g = gevent.spawn(looping)
others = [gevent.spawn(ext.check, ctx("good")) for _ in range(20)]
gevent.joinall(others + [g])
elapsed = time.monotonic() - started
during = [x for x in ticks if started < x < started + elapsed]
print(g.value, sum(o.value.id == "ok" for o in others), len(during), round(elapsed, 3))
"""


def test_looping_hook_under_gevent_lets_other_greenlets_run(tmp_path: Path) -> None:
    script = tmp_path / "hooks.lua"
    script.write_text(LOOPING)
    runner = tmp_path / "run.py"
    runner.write_text(GEVENT_SCRIPT)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(runner), str(script)], cwd=root, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    verdict, ok_count, ticks_during, elapsed = out.stdout.split()
    assert verdict == "Unauthenticated"
    assert int(ok_count) == 20
    assert float(elapsed) < 2.0
    # The ticker greenlet kept running while the loop burnt its 300 ms.
    assert int(ticks_during) >= 10


COUNTING = """
calls = { authenticate = 0, authorize = 0 }
function authenticate(ctx)
  calls.authenticate = calls.authenticate + 1
  local token = ctx.headers.authorization
  if token == "Bearer good" then return { principal = { id = "u1", kind = "user" } } end
  if token == "Bearer short" then return { principal = { id = "u2", kind = "user" }, ttl_seconds = 5 } end
  if token == "Bearer nocache" then return { principal = { id = "u3", kind = "user" }, ttl_seconds = 0 } end
  return { deny = { status = 401, message = "bad" } }
end
function authorize(ctx, principal)
  calls.authorize = calls.authorize + 1
  if ctx.operation == "artifact.write" then return { allow = false } end
  return { allow = true }
end"""


def _counter(ext):
    from app import metrics
    return lambda hook: metrics.EXTENSION_HOOKS.labels(hook=hook, result="ok")._value.get()


def test_allow_and_deny_ttls(make_extensions, clock) -> None:
    ext = make_extensions(COUNTING, clock=clock)
    count = _counter(ext)
    a0, z0 = count("authenticate"), count("authorize")
    ext.check(http_ctx())
    ext.check(http_ctx())
    assert (count("authenticate") - a0, count("authorize") - z0) == (1, 1)
    clock.advance(599)
    ext.check(http_ctx())
    assert count("authenticate") - a0 == 1
    clock.advance(2)  # past the 600 s allow TTL
    ext.check(http_ctx())
    assert count("authenticate") - a0 == 2

    a0 = count("authenticate")
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            ext.check(http_ctx(headers={"authorization": "Bearer wrong"}))
    assert count("authenticate") - a0 == 1
    clock.advance(3.01)  # deny TTL 3 s
    with pytest.raises(Unauthenticated):
        ext.check(http_ctx(headers={"authorization": "Bearer wrong"}))
    assert count("authenticate") - a0 == 2

    a0, z0 = count("authenticate"), count("authorize")
    ext.check(http_ctx(headers={"authorization": "Bearer short"}))
    clock.advance(4)
    ext.check(http_ctx(headers={"authorization": "Bearer short"}))
    assert (count("authenticate") - a0, count("authorize") - z0) == (1, 1)
    clock.advance(2)  # authenticate ttl 5 s; the authorize decision is capped to it
    ext.check(http_ctx(headers={"authorization": "Bearer short"}))
    assert (count("authenticate") - a0, count("authorize") - z0) == (2, 2)

    a0, z0 = count("authenticate"), count("authorize")
    for _ in range(3):
        ext.check(http_ctx(headers={"authorization": "Bearer nocache"}))
    assert (count("authenticate") - a0, count("authorize") - z0) == (3, 3)


def test_noise_headers_do_not_fragment_but_targets_do(make_extensions, clock) -> None:
    ext = make_extensions(COUNTING, clock=clock)
    count = _counter(ext)
    a0 = count("authenticate")
    for i in range(10):
        ext.check(http_ctx(headers={"authorization": "Bearer good", "user-agent": f"ua-{i}",
                                    "x-request-id": str(i), "traceparent": f"00-{i}"},
                           artifact_key=f"blob/{i}"))
    assert count("authenticate") - a0 == 1
    ext.check(http_ctx(namespace_id="android"))
    with pytest.raises(Forbidden):
        ext.check(http_ctx(operation="artifact.write"))
    assert count("authenticate") - a0 == 3


def test_cache_is_bounded_lru(make_extensions, clock) -> None:
    ext = make_extensions(COUNTING, {"KURA_EXTENSION_CACHE_MAX_ENTRIES": "4"}, clock=clock)
    count = _counter(ext)
    for ns in range(10):
        ext.check(http_ctx(namespace_id=f"ns{ns}"))
    assert len(ext._authn_cache) == 4 and len(ext._authz_cache) == 4
    a0 = count("authenticate")
    ext.check(http_ctx(namespace_id="ns9"))
    ext.check(http_ctx(namespace_id="ns0"))
    assert count("authenticate") - a0 == 1


def test_identical_concurrent_misses_run_the_hook_once(make_extensions, auth_service) -> None:
    gate = threading.Event()

    def handler(method, path, headers, body):
        gate.wait(5)
        return 200, {"id": "slow-user"}

    service = auth_service(handler)
    ext = make_extensions("""
function authenticate(ctx)
  local response = kura.http_json("auth", { path = "/who" })
  return { principal = { id = response.body.id, kind = "user" } }
end""", {"KURA_EXTENSION_HTTP_CLIENT_AUTH_BASE_URL": service.url})
    results: list[str] = []

    def call() -> None:
        results.append(ext.check(http_ctx()).id)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    gate.set()
    for thread in threads:
        thread.join()
    assert results == ["slow-user"] * 12
    assert len(service.calls) == 1
