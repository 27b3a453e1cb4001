"""HTTP/2 cells: ``h2load`` downloads with 64 requests in flight, per body size.

Targets of every cell (the same bytes; interleaved, the order flipped every repetition):

- ``kura-h2``: kura-py's cleartext HTTP/2 (prior knowledge), ONE connection, 64 streams;
- ``nginx-h2``: nginx's HTTP/2 (``listen ... http2``), ONE connection, 64 streams;
- ``kura-h1``: kura-py's HTTP/1.1 at the same concurrency: HTTP/1.1 cannot multiplex, so
  64 keep-alive connections with one request each in flight.

Latency percentiles come from h2load's per-request log (``--log-file``); server CPU is the
/proc CPU time of the server's whole process tree across the measurement.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.proctree import tree_cpu_seconds
from bench.stats import MIB, median, percentile, ratio

STREAMS = 64
DEFAULT_SIZES = (4096, MIB)
# Requests per measurement: enough for a few seconds on 2 cores.
DEFAULT_REQUESTS = {4096: 20_000, MIB: 2_000}
H2LOAD_TIMEOUT_S = 600

_DONE = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                   r"(\d+) failed, (\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")


@dataclass
class H2Target:
    """One server and protocol under test."""

    name: str
    port: int
    pid_of_tree: Callable[[], int]
    get_path: Callable[[str], str]  # artifact key -> request path
    http1: bool = False  # drive with --h1 over STREAMS connections instead of one h2 connection


def available() -> bool:
    return shutil.which("h2load") is not None


def run_h2load(url: str, requests: int, http1: bool) -> dict[str, object]:
    """One h2load run against ``url``: counts, wall time, per-request latencies."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log = Path(tmp) / "requests.log"
        argv = ["h2load", "-n", str(requests), "-t", "1", "--log-file", str(log)]
        if http1:
            argv += ["--h1", "-c", str(STREAMS), "-m", "1"]
        else:
            argv += ["-c", "1", "-m", str(STREAMS)]
        proc = subprocess.run([*argv, url], capture_output=True, text=True,
                              timeout=H2LOAD_TIMEOUT_S, check=False)
        out = proc.stdout + proc.stderr
        latencies = []
        if log.exists():
            for line in log.read_text().splitlines():
                fields = line.split("\t")  # start (us), status, duration (us)
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]) / 1e6)
    done, finished, status = _DONE.search(out), _FINISHED.search(out), _STATUS.search(out)
    if done is None or finished is None or status is None:
        raise RuntimeError(f"h2load output not understood (exit {proc.returncode}):\n{out[-1500:]}")
    wall = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    total, succeeded = int(done.group(1)), int(status.group(1))
    return {"requests": total, "succeeded": succeeded, "errors": total - succeeded, "wall_s": wall,
            "latencies_s": latencies, "first_error": "" if total == succeeded else out[-500:]}


def measure(target: H2Target, key: str, size: int, requests: int) -> dict[str, object]:
    """One measurement of one target: throughput, latency, server CPU."""
    root = target.pid_of_tree()
    cpu0 = tree_cpu_seconds(root)
    res = run_h2load(f"http://127.0.0.1:{target.port}{target.get_path(key)}", requests, target.http1)
    cpu = tree_cpu_seconds(root) - cpu0
    ok, wall = int(res["succeeded"]), float(res["wall_s"])  # type: ignore[arg-type]
    lat: list[float] = res["latencies_s"]  # type: ignore[assignment]
    return {
        "target": target.name, "requests": res["requests"], "errors": res["errors"], "wall_s": wall,
        "requests_per_s": ok / wall if wall else 0.0,
        "mib_per_s": ok * size / MIB / wall if wall else 0.0,
        "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
        "server_cpu_s": cpu, "server_cpu_ms_per_request": cpu * 1000 / ok if ok else None,
        "first_error": res["first_error"],
    }


def summarise(samples: list[dict[str, object]]) -> dict[str, object]:
    keys = ("requests_per_s", "mib_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
    out: dict[str, object] = {k: median(s.get(k) for s in samples) for k in keys}  # type: ignore[misc]
    out["errors"] = sum(int(s["errors"]) for s in samples)  # type: ignore[arg-type]
    out["repetitions"] = len(samples)
    return out


def run_h2(targets: list[H2Target], keys: dict[int, str], requests: dict[int, int], reps: int,
           log: Callable[[str], None]) -> list[dict[str, object]]:
    """Every size, interleaved across targets; one row per size."""
    rows = []
    for size, key in keys.items():
        samples: dict[str, list[dict[str, object]]] = {t.name: [] for t in targets}
        for rep in range(reps):
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for target in order:
                sample = measure(target, key, size, requests[size])
                samples[target.name].append(sample)
                log(f"  GET {size:>9} B {STREAMS} in flight rep {rep + 1}/{reps} {target.name:<8} "
                    f"{sample['requests_per_s']:10.1f} req/s {sample['mib_per_s']:9.1f} MiB/s "
                    f"p99 {sample['p99_ms']:8.2f} ms errors {sample['errors']}")
        medians = {name: summarise(s) for name, s in samples.items()}
        row: dict[str, object] = {
            "kind": "http2", "method": "GET", "size_bytes": size, "in_flight": STREAMS,
            "requests": requests[size],
            "targets": {name: {"median": medians[name], "samples": s} for name, s in samples.items()},
        }
        kura = medians.get("kura-h2", {})
        for ref in ("nginx-h2", "kura-h1"):
            if ref in medians:
                row[f"ratio_throughput_vs_{ref}"] = ratio(kura.get("requests_per_s"),
                                                          medians[ref]["requests_per_s"])
        rows.append(row)
    return rows
