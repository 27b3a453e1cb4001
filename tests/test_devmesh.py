"""``python -m app.devmesh`` end to end: three real nodes on free loopback ports, a write
replicated from one to another, and a clean stop of everything on SIGTERM."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from app.devmesh import LAYOUT
from app.run_dir import default_run_dir
from app.run_dir import remove as remove_run_dir
from bench.proctree import descendants, free_ports
from tests.nodes import REPO, session_processes

READY_TIMEOUT_S = 30
# devmesh's own drain timeout (10 s) + the master's two stop graces + teardown.
STOP_TIMEOUT_S = 20


class DevMeshProcess:
    """``python -m app.devmesh`` in a session of its own, its output read line by line."""

    def __init__(self, base_dir: Path, ports: list[int]) -> None:
        self.base_dir = base_dir
        self.http, self.grpc, self.internal = ports[0:3], ports[3:6], ports[6:9]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("KURA_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.devmesh", "--base-dir", str(base_dir),
             "--http-ports", ",".join(map(str, self.http)),
             "--grpc-ports", ",".join(map(str, self.grpc)),
             "--internal-ports", ",".join(map(str, self.internal)),
             "--ready-timeout", str(READY_TIMEOUT_S)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.output: list[str] = []
        self.seen_masters: set[int] = set()
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} after {timeout_s} s:\n{self.text()}") from None
            if line is None:
                raise AssertionError(f"devmesh ended before {prefix!r}:\n{self.text()}")
            self.output.append(line)
            if line.startswith(prefix):
                return line

    def text(self) -> str:
        logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                       for p in sorted(self.base_dir.glob("*.log")))
        return "".join(self.output) + logs

    def masters(self) -> list[int]:
        """The node masters devmesh started: the session leaders below it."""
        found = session_leaders_below(self.process.pid)
        self.seen_masters.update(found)
        return found

    def cleanup(self) -> None:
        """Whatever a failed test left: devmesh's session and every node's."""
        for sid in {self.process.pid, *self.seen_masters, *self.masters()}:
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)
        for spec in LAYOUT:
            remove_run_dir(default_run_dir(str(self.base_dir / spec.name)))


def session_leaders_below(root: int) -> list[int]:
    """The live processes under ``root`` that lead a session: the nodes' masters."""
    leaders = []
    for pid in descendants(root)[1:]:
        try:
            if os.getsid(pid) == pid:
                leaders.append(pid)
        except ProcessLookupError:
            continue  # exited while we looked
    return leaders


@pytest.fixture
def devmesh(tmp_path: Path) -> Iterator[DevMeshProcess]:
    mesh = DevMeshProcess(tmp_path / "mesh", free_ports(9))
    try:
        yield mesh
    finally:
        mesh.cleanup()


def test_devmesh_serves_a_replicating_mesh_and_stops_every_node_on_sigterm(
        devmesh: DevMeshProcess) -> None:
    devmesh.wait_for_line("devmesh: mesh ready", READY_TIMEOUT_S + 5)
    devmesh.wait_for_line("devmesh: Ctrl-C stops", 5)
    # Every node leads a session of its own (so a terminal's Ctrl-C reaches devmesh only).
    masters = devmesh.masters()
    assert len(masters) == len(LAYOUT), devmesh.text()

    urls = [f"http://127.0.0.1:{port}" for port in devmesh.http]
    for url, spec in zip(urls, LAYOUT):
        up = requests.get(url + "/up", timeout=5).json()
        assert up["region"] == spec.region
        assert up["ring_members"] == len(LAYOUT)
        assert f"{url}  grpc" in "".join(devmesh.output)

    key = "/api/cache/gradle/devmesh-key?tenant_id=default"
    assert requests.put(urls[0] + key, data=b"built once", timeout=10).status_code == 201
    deadline = time.monotonic() + 10
    while (response := requests.get(urls[2] + key, timeout=5)).status_code == 404:
        assert time.monotonic() < deadline, "the write never reached the third node"
        time.sleep(0.1)
    assert (response.status_code, response.content) == (200, b"built once")

    pids = {p.pid for sid in masters for p in session_processes(sid)}
    devmesh.process.send_signal(signal.SIGTERM)
    assert devmesh.process.wait(STOP_TIMEOUT_S) == 0, devmesh.text()
    devmesh.wait_for_line("devmesh: all nodes stopped", 5)
    for sid in masters:
        assert session_processes(sid) == [], devmesh.text()
    assert session_processes(devmesh.process.pid) == []
    still_there = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    assert still_there == [], still_there


def test_devmesh_refuses_ports_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        others = free_ports(8)
        result = subprocess.run(
            [sys.executable, "-m", "app.devmesh", "--base-dir", str(tmp_path / "mesh"),
             "--http-ports", f"{others[0]},{busy},{others[1]}",
             "--grpc-ports", ",".join(map(str, others[2:5])),
             "--internal-ports", ",".join(map(str, others[5:8]))],
            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"ports already in use on 127.0.0.1: {busy} (kura-eu http)" in result.stderr
    assert not (tmp_path / "mesh").exists()  # nothing was started
