"""Small JSON files the replicator publishes for the node's other processes.

``<data_dir>/run/members.json`` (``app.members``) and ``<data_dir>/run/mesh.json``
(``app.replication.readiness``) are replaced atomically: written under a temporary
name, then renamed over the old one, so a reader sees the old document or the new
one, never a part. They live on the data disk, which can fill up: a write that fails
leaves the old document and no temporary file behind, is logged once until a write
succeeds again, and is retried by the caller.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("kura.state_files")


def replace_json(path: str, doc: Any) -> None:
    """Atomically replace ``path`` with ``doc`` as JSON; raises OSError, leaving nothing new."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: str) -> Any:
    """The document at ``path``, or None when it is missing or unreadable."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None


class StateFile:
    """One published file, written by one process: :meth:`write` never raises for a full
    disk, it answers False and the caller writes again later."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._failing = False

    def write(self, doc: Any) -> bool:
        try:
            replace_json(self.path, doc)
        except OSError as exc:
            if not self._failing:
                log.warning("event=state_file_write_failed path=%s error=%r, retrying",
                            self.path, exc.strerror)
                self._failing = True
            return False
        if self._failing:
            log.info("event=state_file_written path=%s after_failures=true", self.path)
            self._failing = False
        return True
