"""Group commit: concurrent writes of one process share a segment sync and an LMDB commit."""
from __future__ import annotations

import errno
import os
import threading
import time
from typing import Callable

import pytest
from prometheus_client import REGISTRY

from app.settings import Settings
from app.storage.store import ArtifactStore


def put(store: ArtifactStore, key: str, data: bytes) -> None:
    with store.stage() as staged:
        staged.write(data)
        staged.finish(expected_size=len(data))
        store.put_staged("gradle", "", key, staged)


def body(store: ArtifactStore, key: str) -> bytes | None:
    located = store.lookup("gradle", "", key)
    return None if located is None else store.read_bytes(located)


def syncs(file: str) -> float:
    return REGISTRY.get_sample_value("kura_storage_syncs_total", {"file": file}) or 0.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_writes_queued_during_a_sync_share_the_next_sync_and_commit(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first writer's segment sync is held open until four more writers have queued: those
    four are then published by one segment fdatasync and one LMDB commit, and every one of
    them returns only after it."""
    gate = threading.Event()
    gate.set()
    segment_syncs: list[int] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:  # LMDB syncs data.mdb in C, not through this
        segment_syncs.append(fd)
        gate.wait(30)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store = ArtifactStore(settings)
    datas = {f"k{i}": os.urandom(4096) for i in range(5)}
    errors: list[BaseException] = []

    def writer(key: str) -> None:
        try:
            put(store, key, datas[key])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    put(store, "warm", b"w")  # opens the active segment (a commit of its own)
    segment_syncs.clear()
    lmdb_before = syncs("lmdb")
    gate.clear()
    first = threading.Thread(target=writer, args=("k0",))
    first.start()
    wait_until(lambda: len(segment_syncs) == 1, "the first writer reached its sync")
    others = [threading.Thread(target=writer, args=(f"k{i}",)) for i in range(1, 5)]
    for thread in others:
        thread.start()
    wait_until(lambda: store._commits.queued == 4, "four writers queued behind the first batch")
    assert all(body(store, f"k{i}") is None for i in range(1, 5))  # nothing visible before its sync
    gate.set()
    for thread in [first, *others]:
        thread.join(30)
    assert errors == []
    assert len(segment_syncs) == 2  # k0 alone, then k1..k4 together
    # Two commits (k0's, then one for k1..k4), each syncing its data pages once, plus at most
    # one meta-page sync each: never the four per write of one transaction per write.
    assert 2 <= syncs("lmdb") - lmdb_before <= 4
    for key, data in datas.items():
        assert body(store, key) == data
    store.close()


def test_a_failed_segment_sync_fails_its_writes_and_publishes_nothing(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = [True]
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if failing[0]:
            raise OSError(errno.EIO, "injected I/O error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store = ArtifactStore(settings)
    with pytest.raises(OSError):
        put(store, "lost", b"a" * 4096)
    assert body(store, "lost") is None
    failing[0] = False
    put(store, "kept", b"b" * 4096)
    assert body(store, "kept") == b"b" * 4096
    assert body(store, "lost") is None
    store.close()


def test_a_batch_syncs_and_commits_where_blocking_work_is_offloaded(settings: Settings,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The LMDB commit fdatasyncs data.mdb: it runs through ``offload`` (gevent's thread pool in
    an HTTP worker), never in the writer's own thread, where it would stall the worker's other
    requests for the length of a disk flush. The segment sync, the commit and the meta-page
    sync of a batch take one hand-off."""
    from concurrent.futures import ThreadPoolExecutor

    from app.storage import group_commit

    pool = ThreadPoolExecutor(2)

    handoffs: list[object] = []

    def offload(fn: Callable[..., object], *args: object) -> object:
        handoffs.append(fn)
        return pool.submit(fn, *args).result()

    commit_threads: list[int] = []
    real_write_txn = group_commit.write_txn

    def recording_write_txn(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        commit_threads.append(threading.get_ident())
        return real_write_txn(*args, **kwargs)

    monkeypatch.setattr(group_commit, "write_txn", recording_write_txn)
    store = ArtifactStore(settings, offload=offload)
    put(store, "warm", b"w")  # opens the active segment
    lmdb_before, segment_before = syncs("lmdb"), syncs("segment")
    handoffs.clear()
    put(store, "k", b"k" * 4096)
    assert commit_threads and threading.get_ident() not in commit_threads
    assert len(handoffs) == 1
    assert syncs("segment") - segment_before == 1
    assert syncs("lmdb") - lmdb_before == 2  # a lone write: its commit, then its meta page
    assert body(store, "k") == b"k" * 4096
    store.close()
    pool.shutdown()
