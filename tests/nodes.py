"""Start real kura-py nodes (``gunicorn -c gunicorn.conf.py``) as subprocesses for tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.proctree import free_ports

REPO = Path(__file__).resolve().parent.parent




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
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, path: str = "/ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + path, timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"node not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

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
        return self.process.returncode


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
        "KURA_DRAIN_COMPLETION_TIMEOUT_MS": "10000",
    })
    env.update(overrides)
    return Node(data_dir=data_dir, env=env, log_path=base / f"{name}.log")
