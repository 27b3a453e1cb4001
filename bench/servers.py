"""The servers under test, each started by the harness on free loopback ports and stopped after.

- ``KuraNode``: ``gunicorn -c gunicorn.conf.py`` from the repository, temp data dir.
- ``NginxServer``: nginx in the foreground with a generated config (sendfile on, WebDAV PUT;
  optionally cleartext HTTP/2 instead of HTTP/1.1).
- ``BuildGridServer``: ``bgd server start`` from bench/.venv-buildgrid (current BuildGrid,
  ``BUILDGRID_VERSION``, which needs Python >= 3.12: ``BuildGridServer.install()`` makes the
  venv with such an interpreter), in-memory CAS + AC.

Every server runs in its own session so that stopping it reaches its whole tree,
and nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.proctree import free_port, free_ports, wait_for_port

REPO = Path(__file__).resolve().parent.parent
BUILDGRID_VENV = REPO / "bench" / ".venv-buildgrid"
# 0.4.4 was slower than current BuildGrid on FindMissingBlobs and so hid a ratio below 1.
BUILDGRID_VERSION = "0.9.1"
BUILDGRID_MIN_PYTHON = (3, 12)


class ServerFailed(RuntimeError):
    """A server did not come up; the message holds the tail of its log."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class ManagedProcess:
    name: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.log_path = self.workdir / f"{self.name}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold children that outlived the leader.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def log_tail(self) -> str:
        return _tail(self.log_path)


class KuraNode(ManagedProcess):
    """One kura-py node: HTTP, REAPI and internal ports all free loopback ports."""

    def __init__(self, workdir: Path, data_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__("kura", workdir)
        self.data_dir = data_dir or (workdir / "kura-data")
        self.http_port, self.grpc_port, self.internal_port = free_ports(3)
        self.extra_env = extra_env or {}
        self.spawned_at = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KURA_")}
        env.update({
            "KURA_PORT": str(self.http_port),
            "KURA_GRPC_PORT": str(self.grpc_port),
            "KURA_INTERNAL_PORT": str(self.internal_port),
            "KURA_DATA_DIR": str(self.data_dir),
            "KURA_NODE_URL": f"http://127.0.0.1:{self.internal_port}",
            "KURA_BIND_HOST": "127.0.0.1",
            "KURA_DRAIN_COMPLETION_TIMEOUT_MS": "3000",
            # Bounded like a real deployment: PUT cells write tens of GiB in new keys.
            "KURA_CAS_CAPACITY_BYTES": str(8 * 1024 ** 3),
            "KURA_LOG_LEVEL": "info",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 90.0) -> float:
        """Spawn the node and wait for 200 on /up; returns seconds from spawn to that 200."""
        gunicorn = REPO / ".venv" / "bin" / "gunicorn"
        if not (REPO / "gunicorn.conf.py").exists():
            raise ServerFailed("gunicorn.conf.py is not in the repository yet")
        self.spawned_at = time.monotonic()
        self._spawn([str(gunicorn), "-c", "gunicorn.conf.py"], self.env(), REPO)
        elapsed = wait_http_ok(f"{self.base_url}/up", timeout_s, self.alive)
        if elapsed is None:
            tail = self.log_tail()
            self.stop(grace_s=3)
            raise ServerFailed(f"kura node did not answer 200 on /up within {timeout_s}s:\n{tail}")
        return time.monotonic() - self.spawned_at

    def wait_grpc(self, timeout_s: float = 60.0) -> bool:
        return wait_for_port(self.grpc_port, timeout_s)


def wait_http_ok(url: str, timeout_s: float, alive: object = None) -> float | None:
    """Poll ``url`` until it answers 200; seconds waited, or None on timeout / process exit."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if callable(alive) and not alive():
            return None
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                if resp.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.02)
    return None


class NginxServer(ManagedProcess):
    """nginx serving ``files/`` with sendfile and accepting WebDAV PUT under ``/put/``."""

    def __init__(self, workdir: Path, workers: int, http2: bool = False) -> None:
        super().__init__("nginx", workdir)
        self.port = free_port()
        self.workers = workers
        self.http2 = http2  # cleartext HTTP/2 by prior knowledge on the port (no HTTP/1.1)
        self.root = workdir / "nginx-root"
        self.files_dir = self.root / "files"
        self.put_dir = self.root / "put"

    @staticmethod
    def binary() -> str | None:
        return shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        tmp = self.workdir / "nginx-tmp"
        temps = "\n".join(
            f"    {kind}_temp_path {tmp / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""
daemon off;
master_process on;
worker_processes {self.workers};
user root;
pid {self.workdir / 'nginx.pid'};
error_log {self.workdir / 'nginx-error.log'} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    default_type application/octet-stream;
{temps}
    server {{
        listen 127.0.0.1:{self.port} reuseport{" http2" if self.http2 else ""};
        root {self.root};
        location /files/ {{ }}
        location /put/ {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 4g;
            client_body_buffer_size 1m;
        }}
    }}
}}
"""

    def start(self, timeout_s: float = 20.0) -> None:
        binary = self.binary()
        if binary is None:
            raise ServerFailed("nginx is not installed (apt-get install -y nginx)")
        for path in (self.files_dir, self.put_dir, self.workdir / "nginx-tmp"):
            path.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        self._spawn([binary, "-c", str(conf), "-p", str(self.workdir), "-e", "stderr"],
                    dict(os.environ), self.workdir)
        if not wait_for_port(self.port, timeout_s) or not self.alive():
            tail = self.log_tail()
            self.stop(grace_s=2)
            raise ServerFailed(f"nginx did not start:\n{tail}")

    def clear_uploads(self) -> None:
        shutil.rmtree(self.put_dir, ignore_errors=True)
        self.put_dir.mkdir(parents=True, exist_ok=True)


def _python_version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = out.stdout.split()
    return (int(parts[0]), int(parts[1])) if out.returncode == 0 and len(parts) == 2 else None


def buildgrid_python() -> str | None:
    """An interpreter new enough for BuildGrid: $BENCH_BUILDGRID_PYTHON, python3.13/3.12 on
    PATH, or a pyenv 3.12+ install."""
    candidates = [os.environ.get("BENCH_BUILDGRID_PYTHON", ""), shutil.which("python3.13") or "",
                  shutil.which("python3.12") or "", sys.executable]
    pyenv = Path(os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))) / "versions"
    if pyenv.is_dir():
        candidates += [str(p / "bin" / "python") for p in sorted(pyenv.iterdir(), reverse=True)]
    for python in filter(None, candidates):
        version = _python_version(python)
        if version is not None and version >= BUILDGRID_MIN_PYTHON:
            return python
    return None


class BuildGridServer(ManagedProcess):
    """Current BuildGrid as a cache-only REAPI server with in-memory CAS and action cache."""

    def __init__(self, workdir: Path, memory_bytes: int = 6 * 1024 ** 3) -> None:
        super().__init__("buildgrid", workdir)
        self.port = free_port()
        self.memory_bytes = memory_bytes

    @staticmethod
    def executable() -> Path:
        return BUILDGRID_VENV / "bin" / "bgd"

    @classmethod
    def installed_version(cls) -> str:
        """The BuildGrid version in bench/.venv-buildgrid ("" when there is none)."""
        python = BUILDGRID_VENV / "bin" / "python"
        if not cls.executable().exists() or not python.exists():
            return ""
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                              "print(m.version('buildgrid'))"], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    @classmethod
    def installed(cls) -> bool:
        return cls.installed_version() == BUILDGRID_VERSION

    @classmethod
    def install(cls, log=print) -> None:  # type: ignore[no-untyped-def]
        """(Re)create bench/.venv-buildgrid with BUILDGRID_VERSION unless it has it already."""
        if cls.installed():
            return
        python = buildgrid_python()
        if python is None:
            raise ServerFailed("BuildGrid needs Python >= 3.12 and none was found "
                               "(set BENCH_BUILDGRID_PYTHON to one)")
        log(f"installing BuildGrid {BUILDGRID_VERSION} into {BUILDGRID_VENV} with {python}")
        shutil.rmtree(BUILDGRID_VENV, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(BUILDGRID_VENV)], check=True)
        subprocess.run([str(BUILDGRID_VENV / "bin" / "pip"), "install", "-q",
                        f"buildgrid=={BUILDGRID_VERSION}"], check=True)

    def config(self) -> str:
        return f"""
server:
  - !channel
    address: "127.0.0.1:{self.port}"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
# Its default (5 x cores = 10 here) also caps concurrent RPCs, and two clients
# warming channels next to c=8 hit it: give it headroom so the limit never answers.
thread-pool-size: 32
storages:
  - !lru-storage &cas
    size: {self.memory_bytes // (1024 * 1024)}M
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 1000000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: ""
    services:
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
"""

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            self.install()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ServerFailed(f"BuildGrid {BUILDGRID_VERSION} could not be installed in "
                               f"{BUILDGRID_VENV}: {exc}") from exc
        conf = self.workdir / "buildgrid.yml"
        conf.write_text(self.config())
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self._spawn([str(self.executable()), "server", "start", str(conf)], env, self.workdir)
        if not wait_for_port(self.port, timeout_s) or not self.alive():
            tail = self.log_tail()
            self.stop(grace_s=2)
            raise ServerFailed(f"BuildGrid did not start:\n{tail}")


def machine_description() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_total_bytes": mem_total,
            "python": sys.version.split()[0], "load_avg_at_start": list(os.getloadavg())}


def nginx_version() -> str:
    binary = NginxServer.binary()
    if not binary:
        return ""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip()


def dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
