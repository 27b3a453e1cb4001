from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from app.settings import Settings
from tests.dns_server import DnsServer
from tests.netfaults import FaultyProxy
from tests.nodes import STARTED_NODES, Node, make_node, stop_started_since


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), node_url="http://self:7443")


@pytest.fixture
def store(settings: Settings) -> Iterator["ArtifactStore"]:  # noqa: F821
    from app.storage.store import ArtifactStore

    s = ArtifactStore(settings)
    yield s
    s.close()


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from app.http import create_app

    application = create_app(settings)
    yield application
    application.extensions["kura"].store.close()


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture(autouse=True)
def no_node_outlives_its_test() -> Iterator[None]:
    """Nodes a test started (not a module fixture's) are stopped when it ends."""
    started_before = len(STARTED_NODES)
    yield
    stop_started_since(started_before)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    nodes: list[Node] = []

    def factory(name: str = "node", start: bool = True, **env: str) -> Node:
        node = make_node(tmp_path, name, **env)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield factory
    for node in nodes:
        node.stop()


@pytest.fixture
def node(node_factory) -> Node:  # type: ignore[no-untyped-def]
    return node_factory()


# The HTTP versions every black-box protocol test runs over, as httpx reports them.
HTTP_VERSIONS = {"http/1.1": "HTTP/1.1", "h2c": "HTTP/2"}


@pytest.fixture(params=sorted(HTTP_VERSIONS))
def web(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """An HTTP client speaking HTTP/1.1, or cleartext HTTP/2 with prior knowledge (one
    connection, multiplexed). ``web.http_version`` is what each response must report."""
    h2 = request.param == "h2c"
    with httpx.Client(http1=not h2, http2=h2, timeout=60) as client:
        client.http_version = HTTP_VERSIONS[request.param]  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def faulty_proxy() -> Iterator[Callable[..., FaultyProxy]]:
    """Factory: ``faulty_proxy(host, port)`` starts a FaultyProxy to that target; all are closed at teardown."""
    proxies: list[FaultyProxy] = []

    def factory(target_host: str, target_port: int, **kwargs: object) -> FaultyProxy:
        proxy = FaultyProxy(target_host, target_port, **kwargs)  # type: ignore[arg-type]
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DnsServer]]:
    """Factory: ``dns_server(records)`` starts a loopback DnsServer; all are closed at teardown."""
    servers: list[DnsServer] = []

    def factory(records: Mapping[str, Iterable[str]] | None = None, **kwargs: object) -> DnsServer:
        server = DnsServer(records, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()
