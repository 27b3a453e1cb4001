"""Start real kura-py nodes (``gunicorn -c gunicorn.conf.py``) as subprocesses for tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from app import proc_table
from app.drain import STOP_GRACE_S
from app.run_dir import default_run_dir
from app.run_dir import remove as remove_run_dir
from bench.proctree import free_ports

REPO = Path(__file__).resolve().parent.parent
# The master's log line for every process it starts: gunicorn's workers, supervised children.
STARTED = re.compile(r"Booting worker with pid: (\d+)|event=child_started name=\w+ pid=(\d+)")


@dataclass(frozen=True)
class Proc:
    """One process as /proc shows it."""

    pid: int
    ppid: int
    state: str
    cmdline: str


def session_processes(sid: int) -> list[Proc]:
    """Every process whose session id is ``sid``, zombies included."""
    found = []
    for pid in proc_table.pids():
        fields, command = proc_table.stat_fields(pid), proc_table.cmdline(pid)
        if fields is None or command is None:
            continue  # exited while we looked
        state, ppid, _pgrp, session = fields[:4]
        if int(session) == sid:
            found.append(Proc(pid, int(ppid), state, command))
    return found


@dataclass
class Node:
    data_dir: Path
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.env["KURA_PORT"])

    @property
    def host(self) -> str:
        return self.env.get("KURA_BIND_HOST", "127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def run_dir(self) -> str:
        """The node's per-run directory (node state, Prometheus files), as its master chose it."""
        return self.env.get("KURA_RUN_DIR") or default_run_dir(str(self.data_dir))

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.env['KURA_GRPC_PORT']}"

    @property
    def internal_url(self) -> str:
        return f"http://{self.host}:{self.env['KURA_INTERNAL_PORT']}"

    def start(self, wait: bool = True, timeout: float = 30.0) -> "Node":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=REPO,
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        STARTED_NODES.append(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, path: str = "/ready") -> None:
        self.wait_for(self.url + path, timeout=timeout)

    def wait_for(self, url: str, status: int = 200, timeout: float = 30.0, poll_s: float = 0.1) -> None:
        """Poll ``url`` (any of the node's ports) until it answers ``status``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(url, timeout=1).status_code == status:
                    return
            except requests.RequestException:
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"{url} did not answer {status} after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """Signal every process of the node at once (``kill -- -PGID``, like systemd)."""
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def processes(self) -> list[Proc]:
        """Every process of the node: its master started a session of its own."""
        assert self.process is not None
        return session_processes(self.process.pid)

    def started_pids(self) -> set[int]:
        """Every worker and child the master ever started, from its log."""
        return {int(a or b) for a, b in STARTED.findall(self.log_path.read_text(errors="replace"))}

    def known_pids(self) -> set[int]:
        """Processes of the node that exist or ever existed (take it just before a signal)."""
        return {p.pid for p in self.processes()} | self.started_pids()

    @property
    def stop_bound_s(self) -> float:
        """How long a stop may take: the drain timeout, then STOP_GRACE_S for the workers and
        again for the children, plus a second for process teardown."""
        return int(self.env["KURA_DRAIN_COMPLETION_TIMEOUT_MS"]) / 1000 + 2 * STOP_GRACE_S + 1

    def expect_clean_stop(self, signalled_at: float, before: set[int]) -> None:
        """The master exits 0 within :attr:`stop_bound_s` of ``signalled_at`` (monotonic),
        no process of the node is left and none was started that is not in ``before``
        (:meth:`known_pids` just before the signal): nothing is restarted while stopping."""
        assert self.process is not None
        try:
            code = self.process.wait(max(0.0, signalled_at + self.stop_bound_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node still running {self.stop_bound_s:.1f}s after the signal:\n"
                                 f"{self.log()}") from None
        assert code == 0, self.log()
        left = self.processes()
        assert left == [], f"{left} outlived the master:\n{self.log()}"
        assert self.started_pids() <= before, f"started while stopping:\n{self.log()}"

    def children(self) -> dict[str, list[int]]:
        """The master's live children by role: ``worker``, ``reapi``, ``replicator``."""
        assert self.process is not None
        roles: dict[str, list[int]] = {"worker": [], "reapi": [], "replicator": []}
        for proc in self.processes():
            if proc.ppid != self.process.pid or proc.state == "Z":
                continue
            role = ("reapi" if "-m app.reapi" in proc.cmdline
                    else "replicator" if "-m app.replication" in proc.cmdline else "worker")
            roles[role].append(proc.pid)
        return roles

    def kill_all(self) -> None:
        """SIGKILL the whole node (master, workers and children) at once."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_all()
        # Whatever children are left in the session (a test that killed the master).
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        remove_run_dir(self.run_dir)  # what a killed master could not remove (it is in memory)
        return self.process.returncode


# Every node started; tests/conftest.py stops the ones a test started and left running,
# so a failing or forgetful test never leaves nodes behind for the next ones.
STARTED_NODES: list[Node] = []


def stop_started_since(count: int) -> None:
    """Stop every node started after the first ``count`` that is still running."""
    leftovers, STARTED_NODES[count:] = STARTED_NODES[count:], []
    for node in reversed(leftovers):
        if node.process is not None and node.process.poll() is None:
            node.stop(timeout=15)


def make_node(base: Path, name: str = "node", **overrides: str) -> Node:
    data_dir = base / name
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KURA_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    http_port, grpc_port, internal_port = free_ports(3)
    env.update({
        "KURA_PORT": str(http_port),
        "KURA_GRPC_PORT": str(grpc_port),
        "KURA_INTERNAL_PORT": str(internal_port),
        "KURA_BIND_HOST": "127.0.0.1",
        "KURA_DATA_DIR": str(data_dir),
        "KURA_HTTP_WORKERS": "2",
        # One REAPI process unless a test asks for more (tests/e2e/test_reapi_workers.py).
        "KURA_GRPC_WORKERS": "1",
        "KURA_DRAIN_COMPLETION_TIMEOUT_MS": "10000",
    })
    env.update(overrides)
    return Node(data_dir=data_dir, env=env, log_path=base / f"{name}.log")
