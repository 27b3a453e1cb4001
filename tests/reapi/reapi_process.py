"""Run ``python -m app.reapi`` as a subprocess, as the gunicorn master does."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.reapi.reapi_client import Reapi

REPO = Path(__file__).resolve().parents[2]


class ReapiProcess:
    """One ``python -m app.reapi`` subprocess, its log and a client."""

    def __init__(self, data_dir: Path, port: int, log_path: Path, **env: str) -> None:
        self.port = port
        self.log_path = log_path
        environment = {k: v for k, v in os.environ.items()
                       if not k.startswith("KURA_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        environment.update(KURA_DATA_DIR=str(data_dir), KURA_GRPC_PORT=str(port),
                           KURA_BIND_HOST="127.0.0.1", KURA_TENANT_ID="acme", **env)
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "app.reapi"], cwd=REPO,
                                        env=environment, stdout=self.log, stderr=subprocess.STDOUT)
        self.client: Reapi | None = None

    def wait_listening(self, timeout: float = 30) -> Reapi:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"event=reapi_listening port={self.port}" in self.log_path.read_text():
                self.client = Reapi.connect(self.port)
                return self.client
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"REAPI process did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
