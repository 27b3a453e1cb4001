"""The node's view of its mesh, published by the replicator for the other processes.

The replicator owns membership (static ``KURA_PEERS`` + DNS discovery) and writes the
admitted members to ``<data_dir>/run/members.json`` atomically; the generation and
readiness flags live in the shared node state (``app.node_state``).
"""
from __future__ import annotations

import json
import os


def members_path(data_dir: str) -> str:
    return os.path.join(data_dir, "run", "members.json")


def write_members(data_dir: str, members: list[str]) -> None:
    path = members_path(data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(sorted(members), fh)
    os.replace(tmp, path)


def read_members(data_dir: str) -> list[str]:
    try:
        with open(members_path(data_dir)) as fh:
            members = json.load(fh)
    except (FileNotFoundError, ValueError):
        return []
    return [m for m in members if isinstance(m, str)]
