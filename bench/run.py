"""One command for the whole benchmark: ``.venv/bin/python -m bench.run [--quick] [--out FILE]``.

Starts a fresh kura-py node (temp data dir, free loopback ports) and the
references (nginx, BuildGrid) in the same run, measures interleaved cells,
prints tables and writes the JSON document. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import h2_bench, http_bench, reapi_bench, report, wrk_load
from bench.http_bench import HttpTarget
from bench.memory_bench import run_memory
from bench.servers import (BUILDGRID_VERSION, REPO, BuildGridServer, KuraNode, NginxServer,
                           ServerFailed, machine_description, nginx_version)
from bench.startup_bench import run_startup
from bench.stats import MIB

SECTIONS = ("http", "http2", "reapi", "memory", "startup")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, 1.5 s cells, c=1/8, 100k start-up only, 256 MiB memory test")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long sanity run (used by tests/bench): one small cell per kind")
    p.add_argument("--out", default="bench/results/latest.json", help="JSON output path")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--reps", type=int, help="repetitions per cell (default 3)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 4)")
    p.add_argument("--sizes", help="HTTP body sizes in bytes, comma-separated")
    p.add_argument("--concurrency", help="HTTP concurrencies, comma-separated (default 1,8,20)")
    p.add_argument("--methods", default="GET,PUT", help="HTTP methods (default GET,PUT)")
    p.add_argument("--h2-requests", type=int,
                   help="requests per HTTP/2 measurement, every size (default 20000 for 4 KiB, 2000 for 1 MiB)")
    p.add_argument("--startup-counts", help="artifact counts for start-up (default 0,100000,1000000)")
    p.add_argument("--memory-bytes", type=int, help="transfer size for the memory test (default 1 GiB)")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    p.add_argument("--no-buildgrid", action="store_true", help="skip the BuildGrid reference")
    p.add_argument("--workdir", help="keep servers' files here instead of a temp dir")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())


def plan(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {"reps": 3, "duration": 4.0, "sizes": http_bench.DEFAULT_SIZES,
                           "concurrency": http_bench.DEFAULT_CONCURRENCY,
                           "startup_counts": (0, 100_000, 1_000_000), "startup_reps": 2,
                           "memory_bytes": 1024 * MIB, "reapi_ops": reapi_bench.OPERATIONS,
                           "h2_sizes": h2_bench.DEFAULT_SIZES, "h2_requests": h2_bench.DEFAULT_REQUESTS}
    if args.quick:
        cfg.update(reps=1, duration=1.5, concurrency=(1, 8), startup_counts=(0, 100_000),
                   startup_reps=1, memory_bytes=256 * MIB)
    if args.smoke:
        cfg.update(reps=1, duration=0.5, sizes=(4096, 1 * MIB), concurrency=(1,),
                   startup_counts=(0, 1000), startup_reps=1, memory_bytes=8 * MIB,
                   reapi_ops=(("GetActionResult", (1,)), ("FindMissingBlobs(1000)", (1,))),
                   h2_requests={4096: 640, MIB: 128})
    for name in ("reps", "duration", "memory_bytes"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    if args.sizes:
        cfg["sizes"] = _ints(args.sizes)
    if args.h2_requests:
        cfg["h2_requests"] = {size: args.h2_requests for size in cfg["h2_sizes"]}
    if args.concurrency:
        cfg["concurrency"] = _ints(args.concurrency)
    if args.startup_counts:
        cfg["startup_counts"] = _ints(args.startup_counts)
    cfg["methods"] = tuple(m.strip().upper() for m in args.methods.split(",") if m.strip())
    cfg["sections"] = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(cfg["sections"]) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))}")
    return cfg


def _kura_http_target(node: KuraNode) -> HttpTarget:
    return HttpTarget("kura", node.http_port, lambda: node.pid, lambda key: f"/v1/cache/{key}",
                      "/v1/cache/")


def _nginx_target(nginx: NginxServer) -> HttpTarget:
    return HttpTarget("nginx", nginx.port, lambda: nginx.pid, lambda key: f"/files/{key}", "/put/",
                      after_put_cell=nginx.clear_uploads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = plan(args)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kura-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(), "commit": _git_commit(), "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "config": {k: v for k, v in cfg.items() if k != "reapi_ops"},
        "reapi_operations": [op for op, _ in cfg["reapi_ops"]],
        "references": {"nginx": nginx_version(), "wrk": wrk_load.available()},
        "notes": [],
    }
    servers: list[Any] = []
    node = KuraNode(workdir)
    try:
        _log(f"starting kura-py node in {workdir}")
        node.start()
        servers.append(node)
        if "http" in cfg["sections"]:
            doc["http"] = _run_http_section(cfg, args, workdir, node, servers, doc)
        if "http2" in cfg["sections"]:
            _ensure_alive(node, doc)
            doc["http2"] = _run_h2_section(cfg, args, workdir, node, servers, doc)
        if "reapi" in cfg["sections"]:
            _ensure_alive(node, doc)
            doc["reapi"] = _run_reapi_section(cfg, args, workdir, node, servers, doc)
        if "memory" in cfg["sections"]:
            _ensure_alive(node, doc)
            _log("memory: worker RSS during large transfers")
            body = http_bench.make_body_files(workdir / "bodies", (cfg["memory_bytes"],))[cfg["memory_bytes"]]
            doc["memory"] = run_memory(node, body, _log)
            body.unlink(missing_ok=True)
    finally:
        for server in reversed(servers):
            server.stop()
    if "startup" in cfg["sections"]:
        _log("start-up: time to /up and first GET against stored artifacts")
        doc["startup"] = run_startup(workdir, cfg["startup_counts"], cfg["startup_reps"], _log)
    doc["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    doc["targets"] = report.evaluate_targets(doc)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


def _ensure_alive(node: KuraNode, doc: dict[str, Any]) -> None:
    """Restart the node if it died (noted in the document with its log tail), else do nothing."""
    if node.alive():
        return
    note = f"kura node exited during the run (status {node.proc.returncode if node.proc else '?'}); " \
           f"restarted. Log tail: {node.log_tail()[-1500:]}"
    doc["notes"].append(note)
    _log(note)
    node.stop(grace_s=1)
    node.start()


def _run_http_section(cfg: dict[str, Any], args: argparse.Namespace, workdir: Path, node: KuraNode,
                      servers: list[Any], doc: dict[str, Any]) -> list[dict[str, Any]]:
    targets = [_kura_http_target(node)]
    if not args.no_nginx:
        # Same number of worker processes as the node's HTTP workers (one per core by default).
        nginx = NginxServer(workdir, workers=int(node.env().get("KURA_HTTP_WORKERS") or os.cpu_count() or 1))
        try:
            nginx.start()
            servers.append(nginx)
            targets.append(_nginx_target(nginx))
        except ServerFailed as exc:
            doc["notes"].append(f"nginx reference skipped: {exc}")
            _log(f"nginx reference skipped: {exc}")
    if not wrk_load.available():
        doc["notes"].append("wrk not installed: small bodies driven by the Python bulk client")
    files = http_bench.make_body_files(workdir / "bodies", cfg["sizes"])
    for target in targets:
        http_bench.seed_get_bodies(target, files)
        if target.name == "nginx":
            for size, path in files.items():
                shutil.copyfile(path, nginx.files_dir / http_bench.body_key(size))
    _log(f"http: {len(cfg['methods'])} methods x {len(cfg['sizes'])} sizes x "
         f"{len(cfg['concurrency'])} concurrencies x {cfg['reps']} reps x {len(targets)} targets")
    rows = http_bench.run_http(targets, files, cfg["methods"], cfg["sizes"], cfg["concurrency"],
                               cfg["reps"], cfg["duration"], _log)
    if not args.no_nginx and len(targets) > 1:
        nginx.stop()
        servers.remove(nginx)
    return rows


def _run_h2_section(cfg: dict[str, Any], args: argparse.Namespace, workdir: Path, node: KuraNode,
                    servers: list[Any], doc: dict[str, Any]) -> list[dict[str, Any]]:
    if not h2_bench.available():
        doc["notes"].append("h2load not installed (nghttp2-client): HTTP/2 section skipped")
        return []
    kura_path = _kura_http_target(node).get_path
    targets = [h2_bench.H2Target("kura-h2", node.http_port, lambda: node.pid, kura_path),
               h2_bench.H2Target("kura-h1", node.http_port, lambda: node.pid, kura_path, http1=True)]
    nginx = None
    if not args.no_nginx:
        nginx = NginxServer(workdir / "nginx-h2", http2=True,
                            workers=int(node.env().get("KURA_HTTP_WORKERS") or os.cpu_count() or 1))
        try:
            nginx.start()
            servers.append(nginx)
            targets.insert(1, h2_bench.H2Target("nginx-h2", nginx.port, lambda: nginx.pid,
                                                _nginx_target(nginx).get_path))
        except ServerFailed as exc:
            doc["notes"].append(f"nginx HTTP/2 reference skipped: {exc}")
            _log(f"nginx HTTP/2 reference skipped: {exc}")
            nginx = None
    files = http_bench.make_body_files(workdir / "bodies", cfg["h2_sizes"])
    http_bench.seed_get_bodies(_kura_http_target(node), files)
    if nginx is not None:
        for size, path in files.items():
            shutil.copyfile(path, nginx.files_dir / http_bench.body_key(size))
    keys = {size: http_bench.body_key(size) for size in files}
    _log(f"http2: {len(keys)} sizes x {h2_bench.STREAMS} in flight x {cfg['reps']} reps x "
         f"{len(targets)} targets")
    rows = h2_bench.run_h2(targets, keys, cfg["h2_requests"], cfg["reps"], _log)
    if nginx is not None:
        nginx.stop()
        servers.remove(nginx)
    return rows


def _run_reapi_section(cfg: dict[str, Any], args: argparse.Namespace, workdir: Path, node: KuraNode,
                       servers: list[Any], doc: dict[str, Any]) -> list[dict[str, Any]]:
    if not node.wait_grpc(60):
        doc["notes"].append("kura REAPI port never opened: REAPI section skipped")
        return []
    # The REAPI process is a child of the gunicorn master; its CPU is counted with the tree.
    targets: list[tuple[reapi_bench.ReapiTarget, reapi_bench.ReapiState]] = []
    seed = f"bench-{time.time_ns()}"
    kura = reapi_bench.ReapiTarget("kura", f"127.0.0.1:{node.grpc_port}", node.pid)
    try:
        targets.append((kura, reapi_bench.setup_target(kura, seed)))
    except RuntimeError as exc:
        doc["notes"].append(str(exc))
        _log(str(exc))
        return []
    if not args.no_buildgrid:
        bgd = BuildGridServer(workdir)
        try:
            bgd.start()
            servers.append(bgd)
            ref = reapi_bench.ReapiTarget("buildgrid", f"127.0.0.1:{bgd.port}", bgd.pid)
            targets.append((ref, reapi_bench.setup_target(ref, seed)))
            doc["references"]["buildgrid"] = (f"{BUILDGRID_VERSION} (bench/.venv-buildgrid), "
                                              "in-memory LRU CAS + AC")
        except (ServerFailed, RuntimeError) as exc:
            doc["notes"].append(f"BuildGrid reference skipped: {exc}")
            _log(f"BuildGrid reference skipped: {exc}")
    doc["reapi_setup"] = {t.name: vars(s) for t, s in targets}
    _log(f"reapi: {len(cfg['reapi_ops'])} operations x {cfg['reps']} reps x {len(targets)} targets")
    rows = reapi_bench.run_reapi(targets, cfg["reps"], cfg["duration"], _log, cfg["reapi_ops"])
    for server in list(servers):
        if isinstance(server, BuildGridServer):
            server.stop()
            servers.remove(server)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    text = report.render(doc)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str))
    _log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
