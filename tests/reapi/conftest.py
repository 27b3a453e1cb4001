"""Fixtures: a real grpcio REAPI server on a free loopback port over a real ArtifactStore."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from app.node_state import KIND_REAPI, NodeState, state_path
from app.reapi.server import ReapiServer, build_server
from app.settings import Settings
from app.storage.store import ArtifactStore
from bench.proctree import free_port
from tests.reapi.reapi_client import Reapi
from tests.reapi.reapi_process import ReapiProcess


@dataclass
class RunningReapi:
    """An in-process REAPI server, its store and a connected client."""

    settings: Settings
    store: ArtifactStore
    node_state: NodeState
    server: ReapiServer
    client: Reapi


@pytest.fixture
def reapi_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), tenant_id="acme", bind_host="127.0.0.1",
                    grpc_port=0, node_url="http://self:7443")


@pytest.fixture
def start_reapi() -> Iterator[Callable[[Settings], RunningReapi]]:
    """Start REAPI servers as production builds them (``build_server``); all stop at teardown."""
    started: list[RunningReapi] = []

    def start(settings: Settings) -> RunningReapi:
        node_state = NodeState(state_path(settings.resolved_run_dir))
        node_state.claim_slot(KIND_REAPI)
        store = ArtifactStore(settings, node_state=node_state)
        server = build_server(settings, store, node_state, port=0)
        running = RunningReapi(settings, store, node_state, server, Reapi.connect(server.port))
        started.append(running)
        return running

    yield start
    for running in started:
        running.client.close()
        running.server.stop(0)
        running.node_state.close()


@pytest.fixture
def reapi(reapi_settings: Settings, start_reapi: Callable[[Settings], RunningReapi]) -> RunningReapi:
    return start_reapi(reapi_settings)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ReapiProcess]]:
    """Start ``python -m app.reapi`` subprocesses on one data dir; all are killed at teardown."""
    started: list[ReapiProcess] = []

    def start(port: int | None = None, **env: str) -> ReapiProcess:
        proc = ReapiProcess(tmp_path / "data", port or free_port(),
                            tmp_path / f"reapi-{len(started)}.log", **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
