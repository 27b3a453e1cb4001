"""A three-node mesh on loopback, for machines without Docker: ``python -m app.devmesh``.

It runs the same three nodes as the repository's ``docker-compose.yml`` (names, regions,
tenant and host ports: :data:`LAYOUT`), each a real ``gunicorn -c gunicorn.conf.py``
with its own data directory and log under one base directory, wired into a full mesh
with ``KURA_NODE_URL`` and ``KURA_PEERS``. It waits until every node answers ``/ready``,
prints the URLs, and on Ctrl-C, SIGTERM or SIGHUP sends SIGTERM to the three masters
and waits for them to drain and stop. Other ``KURA_*`` variables of its environment
apply to all three nodes.

Each node runs in a session of its own, so a Ctrl-C in the terminal reaches only this
process, which stops the nodes itself; on Linux a node is also sent SIGTERM if this
process dies without stopping it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Callable, Sequence

from app.drain import STOP_GRACE_S
from app.settings import ConfigError, Settings

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # every port of every node binds here
GUNICORN_CONFIG = "gunicorn.conf.py"
TENANT = "default"
DEFAULT_BASE_DIR = "data-devmesh"
# Defaults for a laptop; a KURA_* variable of the environment wins over them.
NODE_DEFAULTS = {
    "KURA_TENANT_ID": TENANT,
    "KURA_HTTP_WORKERS": "2",
    "KURA_DRAIN_COMPLETION_TIMEOUT_MS": "10000",
}
# Variables that must differ per node: devmesh sets them, the environment cannot.
PER_NODE = ("KURA_PORT", "KURA_GRPC_PORT", "KURA_INTERNAL_PORT", "KURA_BIND_HOST", "KURA_REGION",
            "KURA_DATA_DIR", "KURA_TMP_DIR", "KURA_RUN_DIR", "KURA_NODE_URL", "KURA_PEERS")
PR_SET_PDEATHSIG = 1
POLL_S = 0.2
# The probes go straight to the nodes, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class NodeSpec:
    """One node of the local stack. ``http_port`` and ``grpc_port`` are the host ports
    docker-compose.yml publishes for the same service; the internal (peer) port stays
    on the compose network there, and is on loopback here."""

    name: str
    region: str
    http_port: int
    grpc_port: int
    internal_port: int


LAYOUT: tuple[NodeSpec, ...] = (
    NodeSpec("kura-us", "us-east", 4101, 5101, 7101),
    NodeSpec("kura-eu", "eu-west", 4102, 5102, 7102),
    NodeSpec("kura-ap", "ap-south", 4103, 5103, 7103),
)


def node_env(spec: NodeSpec, layout: Sequence[NodeSpec], base_dir: Path) -> dict[str, str]:
    """The per-node ``KURA_*`` variables: ports, region, data directory and the mesh wiring."""
    def internal_url(node: NodeSpec) -> str:
        return f"http://{HOST}:{node.internal_port}"

    return {
        "KURA_PORT": str(spec.http_port),
        "KURA_GRPC_PORT": str(spec.grpc_port),
        "KURA_INTERNAL_PORT": str(spec.internal_port),
        "KURA_BIND_HOST": HOST,
        "KURA_REGION": spec.region,
        "KURA_DATA_DIR": str(base_dir / spec.name),
        "KURA_NODE_URL": internal_url(spec),
        "KURA_PEERS": ",".join(internal_url(peer) for peer in layout if peer is not spec),
    }


def process_env(environ: dict[str, str], node_vars: dict[str, str]) -> dict[str, str]:
    """The environment of one node's master: ours, the laptop defaults, the node's own."""
    env = {k: v for k, v in environ.items()
           if k not in PER_NODE and k != "PROMETHEUS_MULTIPROC_DIR"}
    for name, value in NODE_DEFAULTS.items():
        env.setdefault(name, value)
    env.update(node_vars)
    return env


def ports_in_use(layout: Sequence[NodeSpec]) -> list[str]:
    """The ports of ``layout`` something else is listening on, as ``"<port> (<node> <role>)"``
    (checked up front: gunicorn would retry a taken port for seconds before it gives up)."""
    taken = []
    for spec in layout:
        for role, port in (("http", spec.http_port), ("grpc", spec.grpc_port),
                           ("internal", spec.internal_port)):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node binds
                try:
                    sock.bind((HOST, port))
                except OSError:
                    taken.append(f"{port} ({spec.name} {role})")
    return taken


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) that has the kernel SIGTERM the node's master when devmesh
    dies without stopping it; the library is loaded here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


@dataclass
class RunningNode:
    """One node's master process, its environment and its log."""

    spec: NodeSpec
    env: dict[str, str]
    settings: Settings
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.spec.http_port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG], cwd=REPO, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent())

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def ready(self) -> bool:
        try:
            with _DIRECT.open(self.url + "/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def stop_bound_s(self) -> float:
        """The drain timeout, then the master's grace for its workers and for its children."""
        return self.settings.drain_completion_timeout_ms / 1000 + 2 * STOP_GRACE_S + 2


class DevMesh:
    """Three nodes started, watched and stopped together."""

    def __init__(self, base_dir: Path, layout: Sequence[NodeSpec], environ: dict[str, str]) -> None:
        self.base_dir = base_dir
        self.nodes: list[RunningNode] = []
        for spec in layout:
            env = process_env(environ, node_env(spec, layout, base_dir))
            # The node's own reader: a bad KURA_* value fails here, naming the variable.
            settings = Settings.from_env(env)
            self.nodes.append(RunningNode(spec, env, settings, base_dir / f"{spec.name}.log"))
        self.stop_requested = ""

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        if not self.stop_requested:
            self.stop_requested = signal.Signals(signum).name

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.start()

    def exited_node(self) -> RunningNode | None:
        return next((node for node in self.nodes if node.exited()), None)

    def wait_ready(self, timeout_s: float) -> bool:
        """Until every node answers ``/ready`` 200 (True), or a stop was requested, a node
        exited or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.nodes)
        while pending:
            if self.stop_requested or self.exited_node() or time.monotonic() > deadline:
                return False
            pending = [node for node in pending if not node.ready()]
            if pending:
                time.sleep(POLL_S)
        return True

    def run_until_stopped(self) -> None:
        while not self.stop_requested and self.exited_node() is None:
            time.sleep(POLL_S)

    def stop(self) -> bool:
        """SIGTERM every running master and wait for each to drain and stop. True when all
        stopped on their own with status 0; a master still running past its bound gets
        its whole session SIGKILLed."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        clean = True
        signalled_at = time.monotonic()
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                code = node.process.wait(max(0.0, signalled_at + node.stop_bound_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"{node.spec.name} did not stop within {node.stop_bound_s:.0f} s: killing it",
                     err=True)
                os.killpg(node.process.pid, signal.SIGKILL)
                code = node.process.wait()
            if code != 0:
                clean = False
                _say(f"{node.spec.name} exited with status {code}; log {node.log_path}", err=True)
        return clean


def _say(message: str, *, err: bool = False) -> None:
    print(f"devmesh: {message}", file=sys.stderr if err else sys.stdout, flush=True)


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ports, got {text!r}") from None
    if len(ports) != len(LAYOUT) or not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"expected {len(LAYOUT)} ports between 1 and 65535, "
                                         f"got {text!r}")
    return ports


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def default(attr: str) -> str:
        return ",".join(str(getattr(spec, attr)) for spec in LAYOUT)

    parser = argparse.ArgumentParser(
        prog="python -m app.devmesh",
        description=f"Run a three-node kura-py mesh on {HOST} (the nodes of docker-compose.yml, "
                    "without Docker). Ctrl-C stops it.")
    parser.add_argument("--base-dir", type=Path, default=Path(DEFAULT_BASE_DIR),
                        help="directory for the nodes' data directories and logs "
                             f"(default ./{DEFAULT_BASE_DIR}; kept between runs)")
    parser.add_argument("--http-ports", type=_ports, default=default("http_port"),
                        help=f"public HTTP ports of the three nodes (default {default('http_port')})")
    parser.add_argument("--grpc-ports", type=_ports, default=default("grpc_port"),
                        help=f"REAPI gRPC ports (default {default('grpc_port')})")
    parser.add_argument("--internal-ports", type=_ports, default=default("internal_port"),
                        help=f"internal peer-API ports (default {default('internal_port')})")
    parser.add_argument("--ready-timeout", type=float, default=120.0,
                        help="seconds to wait for the whole mesh to be ready (default 120)")
    args = parser.parse_args(argv)  # (argparse applies ``type`` to a string default too)
    ports = args.http_ports + args.grpc_ports + args.internal_ports
    if len(set(ports)) != len(ports):
        parser.error(f"every port must be distinct, got {sorted(ports)}")
    return args


def _report_failure(mesh: DevMesh, ready_timeout_s: float) -> None:
    failed = mesh.exited_node()
    if failed is not None:
        _say(f"{failed.spec.name} exited; its log ends with:\n{failed.log_tail()}", err=True)
    else:
        waiting = ", ".join(node.spec.name for node in mesh.nodes if not node.ready())
        _say(f"not ready after {ready_timeout_s:.0f} s: {waiting} (logs in {mesh.base_dir})",
             err=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (REPO / GUNICORN_CONFIG).is_file():
        _say(f"{REPO / GUNICORN_CONFIG} not found: run devmesh from a kura-py checkout", err=True)
        return 1
    layout = [NodeSpec(spec.name, spec.region, http, grpc, internal)
              for spec, http, grpc, internal
              in zip(LAYOUT, args.http_ports, args.grpc_ports, args.internal_ports)]
    try:
        mesh = DevMesh(args.base_dir.resolve(), layout, dict(os.environ))
    except ConfigError as exc:
        _say(f"invalid configuration: {exc}", err=True)
        return 1
    taken = ports_in_use(layout)
    if taken:
        _say(f"ports already in use on {HOST}: {', '.join(taken)} (another devmesh? "
             "choose others with --http-ports, --grpc-ports, --internal-ports)", err=True)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, mesh.request_stop)

    _say(f"data directories and logs under {mesh.base_dir}")
    _say("starting " + ", ".join(f"{node.spec.name} ({node.spec.region})" for node in mesh.nodes))
    started = time.monotonic()
    mesh.start()
    if mesh.wait_ready(args.ready_timeout):
        _say(f"mesh ready in {time.monotonic() - started:.1f} s "
             f"(tenant {mesh.nodes[0].settings.tenant_id})")
        for node in mesh.nodes:
            print(f"  {node.spec.name}  {node.spec.region:<9} {node.url}  "
                  f"grpc {HOST}:{node.spec.grpc_port}  log {node.log_path}", flush=True)
        _say("Ctrl-C stops all three nodes")
        mesh.run_until_stopped()
    status = 0
    if not mesh.stop_requested:  # a node exited, or the mesh never became ready
        status = 1
        _report_failure(mesh, args.ready_timeout)
    _say(f"stopping ({mesh.stop_requested or 'after a failure'})")
    if not mesh.stop():
        status = 1
    _say("all nodes stopped" if status == 0 else "stopped, with errors")
    return status


if __name__ == "__main__":
    sys.exit(main())
