"""Several real kura-py nodes forming a mesh on loopback, for replication tests.

Each node is a real ``gunicorn -c gunicorn.conf.py`` (tests/nodes.py) with its own data
directory. With ``proxies=True`` every node advertises a ``FaultyProxy`` in front of its
internal port as its ``KURA_NODE_URL``, so all peer traffic to it (probes, replication,
bootstrap) crosses that proxy and a test can stall, drop or throttle it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from tests.netfaults import FaultyProxy
from tests.nodes import Node, make_node

TENANT = "default"


@dataclass
class MeshNode:
    name: str
    node: Node
    proxy: FaultyProxy | None = None
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def advertised(self) -> str:
        return self.node.env["KURA_NODE_URL"]

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=30, **kwargs)

    def put(self, path: str, data: bytes, **kwargs: Any) -> requests.Response:
        return self.session.put(self.url + path, data=data, timeout=60, **kwargs)

    def ready(self) -> dict[str, Any]:
        return self.get("/ready").json()

    def rollout(self) -> dict[str, Any]:
        return self.get("/status/rollout").json()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching ``labels`` from this node's /metrics."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


def make_mesh(base: Path, names: list[str], *, proxy_factory: Callable[..., FaultyProxy] | None = None,
              **env: str) -> list[MeshNode]:
    """Configure (not start) a full mesh: every node lists every other one in KURA_PEERS."""
    members = []
    for name in names:
        node = make_node(base, name, KURA_HTTP_WORKERS="1", **env)
        proxy = None
        if proxy_factory is not None:
            proxy = proxy_factory("127.0.0.1", int(node.env["KURA_INTERNAL_PORT"]))
            node.env["KURA_NODE_URL"] = proxy.url
        else:
            node.env["KURA_NODE_URL"] = node.internal_url
        members.append(MeshNode(name, node, proxy))
    for member in members:
        member.node.env["KURA_PEERS"] = ",".join(m.advertised for m in members if m is not member)
    return members


def start(members: list[MeshNode], timeout: float = 60.0) -> None:
    for member in members:
        member.node.start(wait=False)
    for member in members:
        member.node.wait_ready(timeout)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except requests.RequestException as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def quiescent(members: list[MeshNode]) -> bool:
    """Every node is ready and has delivered its whole outbox."""
    for member in members:
        doc = member.rollout()
        if not doc["ready"] or doc["outbox_messages"]:
            return False
    return True


def gradle_path(key: str, namespace: str = "") -> str:
    ns = f"&namespace_id={namespace}" if namespace else ""
    return f"/api/cache/gradle/{key}?tenant_id={TENANT}{ns}"
