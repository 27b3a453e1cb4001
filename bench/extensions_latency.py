"""Added latency of the extension hooks per request (median), cached decision vs hook call.

    .venv/bin/python bench/extensions_latency.py [iterations] [--gevent]

Builds a real Extensions runtime with a small JWT-style script and times
``Extensions.check``: (1) with the decision cached, (2) with ttl_seconds = 0 so
authenticate and authorize run every time, (3) ``response_headers`` with a
signature. Prints one line per case. Every hook call is handed to the Lua
state's own thread and back, so (2) and (3) include that handoff; with
``--gevent`` the process is monkey-patched first, as an HTTP worker is, and the
caller waits as a greenlet does (the REAPI process waits as plain threads).
"""
from __future__ import annotations

import sys

if "--gevent" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import base64
import statistics
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.extensions import Extensions, HookContext  # noqa: E402
from app.settings import Settings  # noqa: E402

SCRIPT = """
local function bearer(h) local a = h.authorization; return a and string.gsub(a, "^Bearer%s+", "") end
function authenticate(ctx)
  local token = bearer(ctx.headers)
  if token == nil then return { deny = { status = 401, message = "missing" } } end
  return { principal = { id = "user-" .. #token, kind = "user", attributes = { projects = { "acme/ios" } } },
           ttl_seconds = TTL }
end
function authorize(ctx, principal)
  local target = ctx.tenant_id .. "/" .. (ctx.namespace_id or "")
  for _, p in ipairs(principal.attributes.projects) do
    if p == target then return { allow = true, ttl_seconds = TTL } end
  end
  return { deny = { status = 403, message = "Forbidden" } }
end
function response_headers(ctx, principal)
  return { sign = { header = "x-tuist-signature", signer = "s", payload = ctx.query.hash } }
end
"""


def _median_us(fn, iterations: int) -> float:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--gevent"]
    iterations = int(args[0]) if args else 2000
    ctx = HookContext("http", "/api/cache/module/{id}", "GET", "artifact.read", "acme", "acme", "ios",
                      "module", "builds/h/Name", "h", {"authorization": "Bearer token-123", "user-agent": "x"},
                      {"hash": "h"})
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for label, ttl in (("cached decision", "600"), ("hook call (authenticate+authorize)", "0")):
            path = Path(tmp) / f"hooks_{ttl}.lua"
            path.write_text(f"local TTL = {ttl}\n" + SCRIPT)
            ext = Extensions.from_settings(Settings(
                tenant_id="acme", extension_enabled=True, extension_script_path=str(path),
                kura_env={"KURA_EXTENSION_SIGNER_S_SECRET": base64.b64encode(b"k").decode()}))
            assert ext is not None
            for _ in range(200):
                ext.check(ctx)
            results[label] = _median_us(lambda: ext.check(ctx), iterations)
            if ttl == "0":
                results["response_headers (signed)"] = _median_us(
                    lambda: ext.response_headers(ctx, None, 200), iterations)
            ext.close()
    mode = "gevent" if "--gevent" in sys.argv else "threads"
    for label, value in results.items():
        print(f"{label:40s} median {value:8.1f} us per request ({mode})")


if __name__ == "__main__":
    main()
