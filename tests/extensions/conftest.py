"""Fixtures: real Lua (lupa) runtimes built from Settings, a fake clock, a fake auth service, a CPU-bound hook."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from app.extensions import Extensions, HookContext
from app.settings import Settings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "hooks"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_extensions(tmp_path: Path) -> Iterator[Callable[..., Extensions]]:
    built: list[Extensions] = []

    def make(script: str | Path, env: dict[str, str] | None = None, *, timeout_ms: int = 25,
             clock: Callable[[], float] | None = None, tenant_id: str = "acme",
             on_abandoned_limit: Callable[[], None] = lambda: None) -> Extensions:
        if isinstance(script, Path):
            path = script
        else:
            path = tmp_path / f"hooks_{len(built)}.lua"
            path.write_text(script)
        env = dict(env or {})
        settings = Settings(tenant_id=tenant_id, extension_enabled=True, extension_script_path=str(path),
                            extension_hook_timeout_ms=timeout_ms, kura_env=env)
        kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
        # Never the default (SIGTERM to this process): a test that reaches the bound says what to do.
        extensions = Extensions.from_settings(settings, on_abandoned_limit=on_abandoned_limit, **kwargs)
        assert extensions is not None
        built.append(extensions)
        return extensions

    yield make
    for extensions in built:
        extensions.close()


def http_ctx(**overrides: Any) -> HookContext:
    values: dict[str, Any] = dict(
        transport="http", route="/api/cache/cas/{id}", method="GET", operation="artifact.read",
        server_tenant_id="acme", tenant_id="acme", namespace_id="ios", producer="xcode",
        artifact_key="blob/1", artifact_hash=None, headers={"authorization": "Bearer good"}, query={})
    values.update(overrides)
    return HookContext(**values)


class FakeAuthService:
    """A local JSON auth backend on a free 127.0.0.1 port (a true boundary)."""

    def __init__(self, handler: Callable[[str, str, dict[str, str], Any], tuple[int, Any]]) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with service.lock:
                    service.calls.append((self.command, self.path))
                status, payload = handler(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def auth_service() -> Iterator[Callable[..., FakeAuthService]]:
    services: list[FakeAuthService] = []

    def start(handler: Callable[[str, str, dict[str, str], Any], tuple[int, Any]]) -> FakeAuthService:
        service = FakeAuthService(handler)
        services.append(service)
        return service

    yield start
    for service in services:
        service.close()


# A hook that burns CPU in Lua (not in a C call): ``{iterations}`` from ``lua_iterations_for``.
CPU_HOOK = """
function authenticate(ctx)
  local x = 0
  for i = 1, {iterations} do x = x + i % 7 end
  return {{ principal = {{ id = "u" .. x % 2, kind = "user" }}, ttl_seconds = 0 }}
end"""


def lua_iterations_for(cpu_s: float) -> int:
    """Iterations of ``CPU_HOOK``'s loop that take ``cpu_s`` of CPU on this machine."""
    from lupa import lua54

    lua = lua54.LuaRuntime()
    loop = lua.eval("function(n) local x = 0 for i = 1, n do x = x + i % 7 end return x end")
    loop(10_000)
    started = time.thread_time()
    loop(200_000)
    return int(200_000 * cpu_s / (time.thread_time() - started))
