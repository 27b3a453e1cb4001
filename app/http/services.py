"""What one HTTP worker process holds: built once by ``create_app`` and kept on the app."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app

from app.node_state import NodeState
from app.settings import Settings
from app.storage.multipart import MultipartUploads
from app.storage.store import ArtifactStore

if TYPE_CHECKING:
    from app.analytics import Analytics
    from app.extensions import Extensions


@dataclass
class NodeServices:
    settings: Settings
    store: ArtifactStore
    uploads: MultipartUploads
    node_state: NodeState
    extensions: "Extensions | None" = None
    analytics: "Analytics | None" = None  # started by the HTTP worker, not by create_app


def services() -> NodeServices:
    return current_app.extensions["kura"]


def store() -> ArtifactStore:
    return current_app.extensions["kura"].store
