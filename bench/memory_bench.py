"""Worker memory during a 1 GiB upload and a 1 GiB download (one connection each).

VmRSS of every HTTP worker is sampled at ~20 Hz by a thread; the result is the
peak growth over the RSS each worker had just before the transfer.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

from bench.bulk_client import BulkSpec, run_bulk
from bench.proctree import RssSampler, cmdline, descendants, http_workers
from bench.servers import KuraNode
from bench.stats import GIB, MIB


def _transfer(node: KuraNode, method: str, key: str, body: Path, size: int,
              workers: list[int]) -> dict[str, object]:
    sampler = RssSampler(workers, hz=20.0)
    sampler.start()
    time.sleep(0.2)
    spec = BulkSpec("127.0.0.1", node.http_port, method, f"/v1/cache/{key}", 1, 0.0, 1,
                    body_file=str(body) if method == "PUT" else "",
                    body_size=size if method == "PUT" else 0)
    result = run_bulk(spec)
    time.sleep(0.2)
    sampler.stop()
    growth = sampler.growth()
    return {
        "method": method, "bytes": size, "errors": result.errors, "first_error": result.first_error,
        "seconds": result.wall_s, "mib_per_s": size / MIB / result.wall_s if result.wall_s else 0.0,
        "samples": sampler.samples,
        "workers": {str(pid): {"baseline_mib": sampler.baseline[pid] / MIB,
                               "peak_mib": sampler.peak[pid] / MIB,
                               "growth_mib": growth[pid] / MIB} for pid in workers},
        "max_growth_mib": max(growth.values()) / MIB if growth else None,
    }


def _find_workers(node: KuraNode, timeout_s: float = 15.0) -> list[int]:
    """The node's HTTP worker pids; waits while gunicorn (re)spawns workers."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = http_workers(node.pid, node.http_port, (node.grpc_port, node.internal_port))
        if workers:
            return workers
        if time.monotonic() > deadline:
            tree = {pid: cmdline(pid) for pid in descendants(node.pid)}
            raise RuntimeError(f"no HTTP worker found under the gunicorn master {node.pid}: "
                               f"tree {tree}; log: {node.log_tail()[-1500:]}")
        time.sleep(0.2)


def run_memory(node: KuraNode, body: Path, log: Callable[[str], None]) -> dict[str, object]:
    size = body.stat().st_size
    workers = _find_workers(node)
    key = hashlib.sha256(f"memory-{time.time_ns()}".encode()).hexdigest()
    up = _transfer(node, "PUT", key, body, size, workers)
    label = f"{size / GIB:.2f} GiB"
    log(f"  {label} upload:   max worker RSS growth {up['max_growth_mib']:.1f} MiB "
        f"({up['mib_per_s']:.0f} MiB/s, errors {up['errors']})")
    down = _transfer(node, "GET", key, body, size, workers)
    log(f"  {label} download: max worker RSS growth {down['max_growth_mib']:.1f} MiB "
        f"({down['mib_per_s']:.0f} MiB/s, errors {down['errors']})")
    return {"kind": "memory", "body_bytes": size, "upload": up, "download": down,
            "worker_cmdlines": {str(pid): cmdline(pid) for pid in workers},
            "target_growth_mib": 50, "size_gib": size / GIB}
