"""Background maintenance of one node's store: capacity eviction and the janitor of
abandoned multipart uploads and partial ByteStream uploads.

Owned and started by the replicator process (one per node), never by ``create_app``.
"""
from __future__ import annotations

import logging
import threading

from app import metrics
from app.storage.eviction import Evictor
from app.storage.multipart import MultipartUploads
from app.storage.partial_uploads import PartialUploads
from app.storage.store import ArtifactStore

log = logging.getLogger("kura.housekeeping")


class Housekeeper:
    def __init__(self, store: ArtifactStore, *, interval_s: float = 2.0,
                 janitor_interval_s: float = 60.0) -> None:
        self.store = store
        self.evictor = Evictor(store, store.settings.resolved_capacity_bytes())
        self.uploads = MultipartUploads(store)
        self.partial_uploads = PartialUploads(store)
        self.interval_s = interval_s
        self.janitor_interval_s = janitor_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, *, janitor: bool = True) -> None:
        self.evictor.run_once()
        if janitor:
            cutoff = self.store.now_ms() - self.store.settings.multipart_upload_ttl_ms
            expired = self.uploads.expire(cutoff)
            if expired:
                metrics.MULTIPART_EXPIRED.inc(expired)
                log.info("event=multipart_expired uploads=%d", expired)
            partials = self.partial_uploads.expire(cutoff)
            if partials:
                log.info("event=partial_uploads_expired uploads=%d", partials)

    def _loop(self) -> None:
        since_janitor = self.janitor_interval_s
        while not self._stop.is_set():
            janitor = since_janitor >= self.janitor_interval_s
            try:
                self.run_once(janitor=janitor)
            except Exception:
                log.exception("event=housekeeping_failed")
            since_janitor = 0.0 if janitor else since_janitor + self.interval_s
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="housekeeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
