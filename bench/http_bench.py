"""HTTP GET/PUT cells: kura-py (Nx route ``/v1/cache/{hash}``) against nginx (sendfile, WebDAV PUT).

Each cell (method, body size, concurrency) is measured ``reps`` times; within a
repetition the two targets run back to back, and the order flips every repetition,
so both see the same background load. Server CPU is the /proc CPU time of the
server's whole process tree across the measurement.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import wrk_load
from bench.bulk_client import BulkSpec, run_bulk
from bench.proctree import tree_cpu_seconds
from bench.stats import GIB, MIB, median, percentile, ratio

SMALL_BODY_MAX = 64 * 1024  # bodies up to this size are driven by wrk
DEFAULT_SIZES = (4096, 17_941_067, 64 * MIB)
DEFAULT_CONCURRENCY = (1, 8, 20)


@dataclass
class HttpTarget:
    """Where one server keeps the benchmark's bodies."""

    name: str
    port: int
    pid_of_tree: Callable[[], int]
    get_path: Callable[[str], str]  # artifact key -> request path
    put_prefix: str
    put_suffix: str = ""
    after_put_cell: Callable[[], None] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def size_label(size: int) -> str:
    if size % MIB == 0:
        return f"{size // MIB} MiB"
    if size % 1024 == 0 and size < MIB:
        return f"{size // 1024} KiB"
    return f"{size:,} B"


def body_key(size: int) -> str:
    return hashlib.sha256(f"kura-bench-body-{size}".encode()).hexdigest()


def make_body_files(directory: Path, sizes: tuple[int, ...]) -> dict[int, Path]:
    """Random bodies on disk, one per size, written once per run."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for size in sizes:
        path = directory / f"body-{size}"
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as fh:
                remaining = size
                while remaining:
                    chunk = os.urandom(min(remaining, 8 * MIB))
                    fh.write(chunk)
                    remaining -= len(chunk)
        files[size] = path
    return files


def seed_get_bodies(target: HttpTarget, files: dict[int, Path]) -> None:
    """Store every body under its fixed key through the target's own PUT."""
    for size, path in files.items():
        spec = BulkSpec("127.0.0.1", target.port, "PUT", target.put_prefix + body_key(size)
                        + target.put_suffix, 1, 0.0, 1, body_file=str(path), body_size=size)
        result = run_bulk(spec)
        if result.errors:
            raise RuntimeError(f"seeding {size} B on {target.name} failed: {result.first_error}")


def measure(target: HttpTarget, method: str, size: int, body_file: Path, concurrency: int,
            duration_s: float, run_tag: str) -> dict[str, object]:
    """One measurement of one target: throughput, latency, server CPU."""
    root = target.pid_of_tree()
    cpu0 = tree_cpu_seconds(root)
    key_prefix = hashlib.sha256(f"{run_tag}-{target.name}-{time.time_ns()}".encode()).hexdigest()[:44]
    if size <= SMALL_BODY_MAX and wrk_load.available():
        if method == "GET":
            res = wrk_load.run_wrk(target.origin + target.get_path(body_key(size)), concurrency,
                                   duration_s)
        else:
            res = wrk_load.run_wrk(target.origin + "/", concurrency, duration_s, method="PUT",
                                   body_file=str(body_file), path_prefix=target.put_prefix,
                                   path_suffix=target.put_suffix, key_prefix=key_prefix)
        requests, errors, wall = res.requests, res.errors, res.wall_s
        p50, p99, client_cpu, first_error = res.p50_s, res.p99_s, None, ""
        if errors:
            first_error = res.raw[-500:]
    else:
        if method == "GET":
            spec = BulkSpec("127.0.0.1", target.port, "GET", target.get_path(body_key(size)),
                            concurrency, duration_s, 100_000)
        else:
            spec = BulkSpec("127.0.0.1", target.port, "PUT",
                            target.put_prefix + "{key}" + target.put_suffix, concurrency,
                            duration_s, 10_000, body_file=str(body_file), body_size=size,
                            key_prefix=key_prefix)
        res_b = run_bulk(spec)
        requests, errors, wall = res_b.requests, res_b.errors, res_b.wall_s
        p50, p99 = percentile(res_b.latencies_s, 50), percentile(res_b.latencies_s, 99)
        client_cpu, first_error = res_b.client_cpu_s, res_b.first_error
    cpu = tree_cpu_seconds(root) - cpu0
    ok = max(requests - errors, 0)
    moved = ok * size
    return {
        "target": target.name, "requests": requests, "errors": errors, "wall_s": wall,
        "requests_per_s": ok / wall if wall else 0.0,
        "mib_per_s": moved / MIB / wall if wall else 0.0,
        "p50_ms": p50 * 1000, "p99_ms": p99 * 1000,
        "server_cpu_s": cpu,
        "server_cpu_ms_per_request": cpu * 1000 / ok if ok else None,
        "server_cpu_s_per_gib": cpu / (moved / GIB) if moved else None,
        "client_cpu_s": client_cpu,
        "first_error": first_error,
    }


def summarise(samples: list[dict[str, object]]) -> dict[str, object]:
    keys = ("requests_per_s", "mib_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request",
            "server_cpu_s_per_gib", "client_cpu_s")
    out: dict[str, object] = {k: median(s.get(k) for s in samples) for k in keys}  # type: ignore[misc]
    out["errors"] = sum(int(s["errors"]) for s in samples)  # type: ignore[arg-type]
    out["repetitions"] = len(samples)
    return out


def run_http(targets: list[HttpTarget], files: dict[int, Path], methods: tuple[str, ...],
             sizes: tuple[int, ...], concurrency: tuple[int, ...], reps: int, duration_s: float,
             log: Callable[[str], None]) -> list[dict[str, object]]:
    """Every cell, interleaved across targets; returns one row per cell."""
    rows = []
    for method in methods:
        for size in sizes:
            for conc in concurrency:
                samples: dict[str, list[dict[str, object]]] = {t.name: [] for t in targets}
                for rep in range(reps):
                    order = targets if rep % 2 == 0 else list(reversed(targets))
                    for target in order:
                        sample = measure(target, method, size, files[size], conc, duration_s,
                                         f"{method}-{size}-{conc}-{rep}")
                        samples[target.name].append(sample)
                        if method == "PUT" and target.after_put_cell:
                            target.after_put_cell()
                        log(f"  {method} {size_label(size):>14} c={conc:<2} rep {rep + 1}/{reps} "
                            f"{target.name:<6} {sample['requests_per_s']:10.1f} req/s "
                            f"{sample['mib_per_s']:9.1f} MiB/s p99 {sample['p99_ms']:8.2f} ms "
                            f"errors {sample['errors']}")
                row: dict[str, object] = {
                    "kind": "http", "method": method, "size_bytes": size, "size": size_label(size),
                    "concurrency": conc, "load_generator": "wrk" if size <= SMALL_BODY_MAX and wrk_load.available() else "bulk_client",
                    "targets": {name: {"median": summarise(s), "samples": s} for name, s in samples.items()},
                }
                if "kura" in samples and "nginx" in samples:
                    kura = row["targets"]["kura"]["median"]  # type: ignore[index]
                    ref = row["targets"]["nginx"]["median"]  # type: ignore[index]
                    row["ratio_throughput"] = ratio(kura["requests_per_s"], ref["requests_per_s"])
                    row["ratio_p99"] = ratio(kura["p99_ms"], ref["p99_ms"])
                    row["ratio_cpu_per_request"] = ratio(kura["server_cpu_ms_per_request"],
                                                         ref["server_cpu_ms_per_request"])
                rows.append(row)
    return rows
