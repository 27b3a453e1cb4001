"""A real Prometheus server (Debian's ``prometheus`` package) scraping nodes on loopback."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
import yaml

from bench.proctree import free_ports

BINARY = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
JOB = "kura"  # the scrape job the alert rules expect (ops/prometheus/alerts.yml)


class Prometheus:
    """``prometheus`` scraping ``targets`` (host:port → target labels) every ``interval_s``
    as job ``kura``, evaluating ``rule_files``; its data in ``workdir``."""

    def __init__(self, workdir: Path, targets: dict[str, dict[str, str]], rule_files: list[Path],
                 interval_s: float = 1.0) -> None:
        assert BINARY is not None, "no prometheus binary"
        workdir.mkdir(parents=True, exist_ok=True)
        interval = f"{int(interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval,
                       "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [
                {"targets": [target], "labels": labels} for target, labels in targets.items()]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        [port] = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self.targets = list(targets)
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [BINARY, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        response = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        assert body["data"]["resultType"] == "vector", (expr, body)
        return body["data"]["result"]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its evaluation health (``/api/v1/rules``)."""
        body = requests.get(self.url + "/api/v1/rules", timeout=10).json()
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    def wait_for_scrapes(self, after: float, timeout: float = 15.0) -> None:
        """Until every target has been scraped by a scrape that started after ``after`` (Unix
        time): what the nodes counted before ``after`` is then in Prometheus."""
        deadline = time.monotonic() + timeout
        stamps: dict[str, float] = {}
        while time.monotonic() < deadline:
            stamps = {s["metric"]["instance"]: float(s["value"][1])
                      for s in self.query(f'timestamp(up{{job="{JOB}"}})')}
            if len(stamps) == len(self.targets) and min(stamps.values()) > after:
                return
            time.sleep(0.1)
        raise TimeoutError(f"no scrape of every target after {after}: {stamps}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
