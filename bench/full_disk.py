"""Full data disk: a node whose data directory is a small tmpfs, filled and held full under load.

    .venv/bin/python -m bench.full_disk                   # 64 MiB, held full for 300 s (~6 min)
    .venv/bin/python -m bench.full_disk --hold-s 30       # a quick look

Needs root (it mounts a tmpfs); loopback traffic only, a handful of client threads. Steps:

1. start a node (``gunicorn -c gunicorn.conf.py``, 2 HTTP workers) on a fresh tmpfs data
   directory and store a few artifacts (a key-value document, a Gradle artifact, an action
   result);
2. let a "disk hog" take every free byte of the filesystem, again and again (another tenant
   of a shared disk: what eviction frees is gone at once), and send 1 MiB PUTs until the
   first 429;
3. hold the disk full for ``--hold-s`` seconds under load: HTTP writes (1 MiB Gradle, 64 KiB
   Nx, key-value documents), HTTP reads of the stored artifacts, ``/up``, ``/ready``,
   ``/metrics``, gRPC ByteStream writes and GetActionResult reads;
4. free the space and measure how long until a write succeeds again.

Reports (JSON on stdout): the node's process deaths (every process that vanished while the
master lived, sampled every 200 ms, and processes started after the start), the statuses
of every operation while full and after, the PUTs until the first 429, and the time to
resume writing. ``tests/e2e/test_full_disk.py`` runs the same scenario for a short hold.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import requests

from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2_grpc as bs_grpc
from bench.proctree import descendants
from bench.tmpfs import DiskHog

MIB = 1024 * 1024
T = "tenant_id=default"
WRITE_OPS = ("put_1mib", "put_nx", "put_kv", "grpc_write")
SEED_KV = "seed-kv"
SEED_GRADLE = "seed-gradle"
SEED_ACTION = re_pb2.Digest(hash=hashlib.sha256(b"seed action").hexdigest(), size_bytes=11)


@dataclass
class Target:
    """The node under test."""

    base_url: str
    grpc_target: str
    disk: Path  # its data directory's filesystem
    master_pid: int


@dataclass
class Report:
    deaths: list[int] = field(default_factory=list)
    processes: int = 0
    puts_until_429: int = 0
    first_429: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # phase -> op -> status
    hold_s: float = 0.0
    resume_s: float | None = None

    def to_json(self) -> dict:
        return {
            "process_deaths": len(self.deaths), "dead_pids": self.deaths,
            "processes": self.processes, "puts_until_first_429": self.puts_until_429,
            "first_429": self.first_429, "held_full_s": round(self.hold_s, 1),
            "resume_writing_s": None if self.resume_s is None else round(self.resume_s, 2),
            "statuses": self.statuses,
        }


class Census:
    """Every process below the master, sampled: a pid that vanishes while the master lives died."""

    def __init__(self, master_pid: int, interval_s: float = 0.2) -> None:
        self.master_pid = master_pid
        self.interval_s = interval_s
        self.initial = set(descendants(master_pid))
        self.seen = set(self.initial)
        self.deaths: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="census", daemon=True)

    def _run(self) -> None:
        live = set(self.seen)
        while not self._stop.wait(self.interval_s):
            now = set(descendants(self.master_pid))
            if self.master_pid not in now:
                self.deaths.append(self.master_pid)
                return
            self.deaths.extend(sorted(live - now))
            self.seen |= now
            live = now

    def start(self) -> "Census":
        self._thread.start()
        return self

    def stop(self) -> list[int]:
        """The pids that died, and those started after the census began (a restart)."""
        self._stop.set()
        self._thread.join()
        return sorted(set(self.deaths) | (self.seen - self.initial))


class Client:
    """HTTP and gRPC calls of the scenario; each returns a status label."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.http = requests.Session()
        self.channel = grpc.insecure_channel(target.grpc_target)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)
        self.action_cache = re_grpc.ActionCacheStub(self.channel)
        self._body = bytearray(os.urandom(MIB))

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    def _unique(self, size: int) -> bytes:
        self._body[:16] = uuid.uuid4().bytes  # new content each time, without 1 MiB of urandom
        return bytes(self._body[:size])

    def _http(self, method: str, path: str, **kwargs: object) -> requests.Response:
        return self.http.request(method, self.target.base_url + path, timeout=30, **kwargs)

    def put_1mib(self, key: str | None = None) -> requests.Response:
        return self._http("PUT", f"/api/cache/gradle/{key or uuid.uuid4().hex}?{T}",
                          data=self._unique(MIB))

    def put_nx(self) -> requests.Response:
        return self._http("PUT", f"/v1/cache/{uuid.uuid4().hex}?{T}", data=self._unique(64 * 1024))

    def put_kv(self, cas_id: str | None = None) -> requests.Response:
        doc = {"cas_id": cas_id or uuid.uuid4().hex, "entries": [{"value": uuid.uuid4().hex}]}
        return self._http("PUT", f"/api/cache/keyvalue?{T}", json=doc)

    def grpc_write(self) -> str:
        data = self._unique(256 * 1024)
        digest = hashlib.sha256(data).hexdigest()
        resource = f"uploads/{uuid.uuid4()}/blobs/{digest}/{len(data)}"
        requests_ = (bs_pb2.WriteRequest(resource_name=resource if offset == 0 else "",
                                         write_offset=offset, data=data[offset:offset + 64 * 1024],
                                         finish_write=offset + 64 * 1024 >= len(data))
                     for offset in range(0, len(data), 64 * 1024))
        try:
            self.bytestream.Write(requests_, timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"

    def get_action(self) -> str:
        try:
            self.action_cache.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=SEED_ACTION), timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"

    def seed(self) -> None:
        for response in (self.put_kv(SEED_KV), self.put_1mib(SEED_GRADLE)):
            response.raise_for_status()
        self.action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=SEED_ACTION, action_result=re_pb2.ActionResult(exit_code=0)), timeout=30)

    def operations(self) -> dict[str, Callable[[], object]]:
        return {
            "put_1mib": self.put_1mib, "put_nx": self.put_nx, "put_kv": self.put_kv,
            "grpc_write": self.grpc_write, "grpc_get_action": self.get_action,
            "get_kv": lambda: self._http("GET", f"/api/cache/keyvalue/{SEED_KV}?{T}"),
            "get_gradle": lambda: self._http("GET", f"/api/cache/gradle/{SEED_GRADLE}?{T}"),
            "up": lambda: self._http("GET", "/up"),
            "ready": lambda: self._http("GET", "/ready"),
            "metrics": lambda: self._http("GET", "/metrics"),
        }


def label(outcome: object) -> str:
    if isinstance(outcome, requests.Response):
        return str(outcome.status_code)
    return str(outcome)


class Load:
    """Client threads, each cycling through its operations until stopped; statuses are counted
    per phase (``phase`` is switched by the scenario)."""

    GROUPS = (("put_1mib", "put_kv"), ("put_nx", "put_1mib"), ("grpc_write", "grpc_get_action"),
              ("get_kv", "get_gradle", "up", "ready", "metrics"))

    def __init__(self, target: Target, pause_s: float = 0.01) -> None:
        self.target = target
        self.pause_s = pause_s
        self.phase = "full"
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(group,), daemon=True)
                         for group in self.GROUPS]

    def _run(self, group: tuple[str, ...]) -> None:
        client = Client(self.target)
        ops = client.operations()
        try:
            while not self._stop.is_set():
                for name in group:
                    try:
                        status = label(ops[name]())
                    except requests.RequestException as exc:
                        status = f"error:{type(exc).__name__}"
                    with self._lock:
                        self.counts[(self.phase, name, status)] += 1
                    self._stop.wait(self.pause_s)
        finally:
            client.close()

    def start(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> dict[str, dict[str, dict[str, int]]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (phase, name, status), count in sorted(self.counts.items()):
            out.setdefault(phase, {}).setdefault(name, {})[status] = count
        return out


def run(target: Target, hold_s: float, resume_timeout_s: float = 60.0,
        max_fill_puts: int = 200) -> Report:
    """The scenario on a running node (see the module docstring)."""
    report = Report()
    client = Client(target)
    client.seed()
    census = Census(target.master_pid).start()
    report.processes = len(census.initial)
    hog = DiskHog(target.disk).start()
    load: Load | None = None
    try:
        for attempt in range(1, max_fill_puts + 1):
            response = client.put_1mib()
            if response.status_code == 429:
                report.puts_until_429 = attempt
                report.first_429 = {"retry_after": response.headers.get("Retry-After", ""),
                                    "content_type": response.headers.get("Content-Type", ""),
                                    "body": response.text}
                break
        load = Load(target).start()
        started = time.monotonic()
        time.sleep(hold_s)
        report.hold_s = time.monotonic() - started
    finally:
        hog.release()
    freed = time.monotonic()
    load.phase = "freed"
    while time.monotonic() - freed < resume_timeout_s:
        if client.put_1mib().status_code in (200, 201):
            report.resume_s = time.monotonic() - freed
            break
        time.sleep(0.05)
    time.sleep(2)  # a little load after the space came back
    report.statuses = load.stop()
    report.deaths = census.stop()
    client.close()
    return report


def main(argv: list[str] | None = None) -> int:
    from bench.servers import KuraNode, ServerFailed, wait_http_ok
    from bench.tmpfs import mount, unmount

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold-s", type=float, default=300.0, help="seconds held full under load")
    parser.add_argument("--size-mib", type=int, default=64, help="size of the data tmpfs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the node's log here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kura-full-disk-"))
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "disk"
    mount(disk, args.size_mib * MIB)
    node = KuraNode(workdir, data_dir=disk / "data", extra_env={
        "KURA_HTTP_WORKERS": "2", "KURA_CAS_CAPACITY_BYTES": "", "KURA_DRAIN_COMPLETION_TIMEOUT_MS": "5000"})
    try:
        node.start()
        node.wait_grpc()
        if wait_http_ok(f"{node.base_url}/ready", 60, node.alive) is None:
            raise ServerFailed(f"the node did not become ready:\n{node.log_tail()}")
        target = Target(node.base_url, f"127.0.0.1:{node.grpc_port}", disk, node.pid)
        report = run(target, args.hold_s)
        print(json.dumps({"size_mib": args.size_mib, **report.to_json(), "log": str(node.log_path)},
                         indent=2))
    finally:
        node.stop()
        unmount(disk)
    return 0


if __name__ == "__main__":
    sys.exit(main())
