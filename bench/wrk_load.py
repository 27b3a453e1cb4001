"""wrk driver for small bodies (GET, and PUT through a generated Lua script)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}

# Each wrk thread numbers itself in setup(); request() then makes a unique 64-hex
# key per request so every PUT writes a new artifact (and nginx a new file).
_PUT_SCRIPT = """
local body_file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
local body = body_file:read("*a")
body_file:close()
local prefix = os.getenv("BENCH_PATH_PREFIX")
local suffix = os.getenv("BENCH_PATH_SUFFIX") or ""
local key_prefix = os.getenv("BENCH_KEY_PREFIX")
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  counter = 0
end
function request()
  counter = counter + 1
  local key = string.format("%s%04x%012x", key_prefix, tid, counter)
  return wrk.format("PUT", prefix .. key .. suffix,
    {["Content-Type"] = "application/octet-stream"}, body)
end
"""

_GET_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format("BENCH_P50_US %d\\nBENCH_P99_US %d\\n",
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    p50_s: float
    p99_s: float
    raw: str


def available() -> bool:
    return shutil.which("wrk") is not None


def _seconds(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not match:
        return 0.0
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, concurrency: int, duration_s: float, *, method: str = "GET",
            body_file: str = "", path_prefix: str = "", path_suffix: str = "",
            key_prefix: str = "") -> WrkResult:
    """Run wrk against ``url``; for PUT, ``url`` is only the origin and keys come from the script."""
    threads = max(1, min(concurrency, 2))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if method == "PUT":
            script.write(_PUT_SCRIPT + _GET_SCRIPT)
        else:
            script.write(_GET_SCRIPT)
        script_path = script.name
    env = dict(os.environ, BENCH_BODY_FILE=body_file, BENCH_PATH_PREFIX=path_prefix,
               BENCH_PATH_SUFFIX=path_suffix, BENCH_KEY_PREFIX=key_prefix[:48].rjust(48, "0"))
    duration = max(1, round(duration_s))
    try:
        proc = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s",
             "-s", script_path, url],
            capture_output=True, text=True, env=env, timeout=duration + 60)
    finally:
        os.unlink(script_path)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out}")
    reqs = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not reqs:
        raise RuntimeError(f"cannot parse wrk output: {out}")
    requests = int(reqs.group(1))
    wall = float(reqs.group(2)) * _UNITS[reqs.group(3)]
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock_err:
        errors += sum(int(x) for x in sock_err.groups())
    p50 = re.search(r"BENCH_P50_US (\d+)", out)
    p99 = re.search(r"BENCH_P99_US (\d+)", out)
    return WrkResult(
        requests=requests, errors=errors, wall_s=wall,
        requests_per_s=requests / wall if wall else 0.0,
        p50_s=int(p50.group(1)) / 1e6 if p50 else 0.0,
        p99_s=int(p99.group(1)) / 1e6 if p99 else 0.0,
        raw=out)
