"""Partial ByteStream uploads: kept bytes, budget accounting, locking and expiry (real LMDB)."""
from __future__ import annotations

import os
import threading

import pytest

from app.errors import BudgetExhausted
from app.settings import Settings
from app.storage import partial_uploads as partial_uploads_module
from app.storage.housekeeping import Housekeeper
from app.storage.partial_uploads import PartialUploads, UploadBusy
from app.storage.store import ArtifactStore


def open_upload(uploads: PartialUploads, name: str = "ns\0u1\0blob/h/100"):  # type: ignore[no-untyped-def]
    return uploads.open(name, limit=100, too_large_message="too large", digest_function="sha256")


def test_kept_bytes_count_against_the_budget_until_finished(settings: Settings) -> None:
    store = ArtifactStore(settings)
    uploads = PartialUploads(store)
    with open_upload(uploads) as upload:
        assert upload.kept_bytes == 0
    assert uploads.committed_bytes("ns\0u1\0blob/h/100") is None  # an empty upload is not kept
    with open_upload(uploads) as upload:
        upload.body.write(b"a" * 40)
    assert uploads.committed_bytes("ns\0u1\0blob/h/100") == 40
    assert store.staging.used_bytes() == 40
    assert store.node_state.tmp_bytes() == 0
    with open_upload(uploads) as upload:
        assert upload.kept_bytes == 40
        upload.body.write(b"b" * 20)
    assert store.staging.used_bytes() == 60
    with open_upload(uploads) as upload:
        upload.body.restart()
        upload.body.write(b"c" * 10)
    assert store.staging.used_bytes() == 10
    with open_upload(uploads) as upload:
        upload.discard()
    assert uploads.committed_bytes("ns\0u1\0blob/h/100") is None
    assert store.staging.used_bytes() == 0
    assert os.listdir(uploads.directory) == []
    store.close()


def test_kept_bytes_fill_the_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=str(tmp_path / "data"), node_url="http://self:7443",
                        tmp_dir_max_bytes=2 * 1024 * 1024)
    store = ArtifactStore(settings)
    uploads = PartialUploads(store)
    with uploads.open("first", limit=None, too_large_message="", digest_function="sha256") as upload:
        upload.body.write(b"a" * 2 * 1024 * 1024)
    assert store.node_state.tmp_bytes() == 0
    with pytest.raises(BudgetExhausted):
        store.check_write_budget()
    store.close()


def test_a_second_call_for_the_same_upload_waits_for_the_first(settings: Settings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(settings)
    uploads = PartialUploads(store)
    monkeypatch.setattr(partial_uploads_module, "LOCK_WAIT_S", 0.3)
    release = threading.Event()
    holding = threading.Event()

    def first() -> None:
        with open_upload(uploads) as upload:
            upload.body.write(b"x" * 30)
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(30)
    with pytest.raises(UploadBusy):
        with open_upload(uploads):
            pass
    release.set()
    thread.join(30)
    with open_upload(uploads) as upload:
        assert upload.kept_bytes == 30
    store.close()


def test_janitor_expires_abandoned_partial_uploads(settings: Settings) -> None:
    now = [1_000_000.0]
    store = ArtifactStore(settings, clock=lambda: now[0])
    uploads = PartialUploads(store)
    with open_upload(uploads, "old") as upload:
        upload.body.write(b"o" * 50)
    orphan = os.path.join(uploads.directory, "0" * 64)  # a killed process left it, unrecorded
    with open(orphan, "wb") as f:
        f.write(b"z" * 10)
    os.utime(orphan, (0, 0))
    keeper = Housekeeper(store)
    keeper.run_once()
    assert uploads.committed_bytes("old") == 50  # younger than the TTL
    assert os.path.exists(orphan) is False
    now[0] += settings.multipart_upload_ttl_ms / 1000 + 1
    with open_upload(uploads, "busy") as busy:
        busy.body.write(b"b")
        keeper.run_once()
        assert uploads.committed_bytes("old") is None
    assert uploads.committed_bytes("busy") == 1  # held by a call: left alone, then recorded
    assert store.staging.used_bytes() == 1
    store.close()
