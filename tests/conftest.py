from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from app.settings import Settings
from tests.nodes import Node, make_node


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
