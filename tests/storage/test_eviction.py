"""Eviction under pressure: strictly oldest segment first whoever owns it (alive, dead or this
process), and every failure (EIO, a crash) is finished by a later run. Real LMDB and segment
files; other owners are real processes; faults are injected at the OS boundary."""
from __future__ import annotations

import errno
import multiprocessing
import os
from multiprocessing.connection import Connection
from typing import Callable, Iterator

import lmdb
import pytest

from app.errors import BudgetExhausted
from app.settings import Settings
from app.storage.eviction import MAX_ATTEMPTS, Evictor
from app.storage.segments import SEAL_AFTER_S, segment_path
from app.storage.store import ArtifactStore

KIB = 1024
ctx = multiprocessing.get_context("spawn")


def _owner_loop(data_dir: str, conn: Connection) -> None:
    """Another process of the node: appends what it is told to its own active segment."""
    store = ArtifactStore(Settings(data_dir=data_dir, node_url="http://self:7443"))
    while True:
        command, *args = conn.recv()
        if command == "put":
            key, data = args
            try:
                store.put_bytes("gradle", "", key, data, inline=False)
                conn.send(store.lookup("gradle", "", key).manifest.segment_id)
            except BudgetExhausted as exc:
                conn.send(repr(exc))
        elif command == "crash":
            os._exit(0)  # no close: its active segment stays unsealed, its owner dead
        else:
            store.close()
            conn.send("closed")
            return


class Owner:
    def __init__(self, data_dir: str) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_owner_loop, args=(data_dir, child), daemon=True)
        self.process.start()

    def put(self, key: str, data: bytes) -> int | str:
        self.conn.send(("put", key, data))
        return self.conn.recv()

    def crash(self) -> None:
        self.conn.send(("crash",))
        self.process.join(30)

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(("close",))
            self.conn.recv()
        self.process.join(30)


@pytest.fixture
def owners(settings: Settings) -> Iterator[Callable[[], Owner]]:
    started: list[Owner] = []

    def start() -> Owner:
        started.append(Owner(settings.data_dir))
        return started[-1]

    yield start
    for owner in started:
        owner.close()


def put(store: ArtifactStore, key: str, data: bytes) -> int:
    store.put_bytes("gradle", "", key, data, inline=False)
    return store.lookup("gradle", "", key).manifest.segment_id


def present(store: ArtifactStore, key: str) -> bool:
    return store.lookup("gradle", "", key) is not None


def test_a_dead_owners_segment_goes_in_its_turn_not_before_an_older_live_one(
        store: ArtifactStore, owners: Callable[[], Owner]) -> None:
    live, dead = owners(), owners()
    assert live.put("old", b"o" * 200 * KIB) == 1  # a live process's active segment: the oldest
    assert dead.put("new", b"n" * 200 * KIB) == 2
    dead.crash()
    Evictor(store, capacity_bytes=300 * KIB).run_once()
    assert not present(store, "old"), "the oldest segment goes first, though its owner is alive"
    assert present(store, "new"), "a dead owner's newer segment is not evicted ahead of it"
    # The live owner saw its segment sealed: it goes on in a new one.
    assert live.put("later", b"l" * KIB) == 3
    assert store.read_bytes(store.lookup("gradle", "", "later")) == b"l" * KIB


def test_this_process_active_segment_is_rotated_when_it_is_the_oldest(
        store: ArtifactStore, owners: Callable[[], Owner]) -> None:
    assert put(store, "old", b"o" * 200 * KIB) == 1
    other = owners()
    assert other.put("new", b"n" * 200 * KIB) == 2
    Evictor(store, capacity_bytes=300 * KIB).run_once()
    assert not present(store, "old")
    assert present(store, "new")
    assert put(store, "later", b"l" * KIB) == 3


def test_a_writer_starts_a_new_segment_a_minute_after_the_last_one(settings: Settings) -> None:
    now = [1_000_000.0]
    store = ArtifactStore(settings, clock=lambda: now[0])
    first = put(store, "a", b"a" * KIB)
    now[0] += SEAL_AFTER_S - 1
    assert put(store, "b", b"b" * KIB) == first
    now[0] += 1
    assert put(store, "c", b"c" * KIB) == first + 1  # so a segment's id dates what is in it
    store.close()


def test_bytes_appended_to_a_segment_evicted_meanwhile_are_never_published(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evictor takes a segment while a write to it waits for its fdatasync: the write must
    fail (and can be retried), not publish a manifest that points at an unlinked file."""
    evictor: list[Evictor] = []
    armed = [True]
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        real_fdatasync(fd)
        if armed[0] and evictor:
            armed[0] = False
            evictor[0].evict_segment(evictor[0].store.segments.active_segment_id)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    store = ArtifactStore(settings)
    evictor.append(Evictor(store, capacity_bytes=1))
    with pytest.raises(BudgetExhausted):
        store.put_bytes("gradle", "", "k", b"x" * KIB, inline=False)
    assert not present(store, "k")
    put(store, "k", b"y" * KIB)  # the retry lands in a new segment
    assert store.read_bytes(store.lookup("gradle", "", "k")) == b"y" * KIB
    store.close()


def _three_segments(settings: Settings) -> tuple[ArtifactStore, list[int]]:
    now = [1_000_000.0]
    store = ArtifactStore(settings, clock=lambda: now[0])
    ids = []
    for key in ("s1", "s2", "s3"):
        ids.append(put(store, key, key.encode() * 50 * KIB))
        now[0] += SEAL_AFTER_S
    return store, ids


def test_eio_unlinking_a_segment_is_finished_by_the_next_run(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ids = _three_segments(settings)
    victim = segment_path(store.segments_dir, ids[0])
    real_unlink = os.unlink
    failures = [1]

    def unlink(path: str | bytes | os.PathLike, *args: object, **kwargs: object) -> None:
        if os.fspath(path) == victim and failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    evictor = Evictor(store, capacity_bytes=250 * KIB)
    evictor.run_once()
    assert os.path.exists(victim)  # the EIO: the file is still there
    evictor.run_once()
    assert not os.path.exists(victim), "the next run must finish the eviction"
    assert not present(store, "s1")
    assert present(store, "s2") and present(store, "s3")
    assert [seg for seg, _, _ in evictor._segments()] == ids[1:]
    store.close()


class _FailingCommits:
    """The store's LMDB environment whose ``fail_at``-th write commit from now fails with EIO
    (the C library's answer to a bad disk); everything else is the real environment."""

    def __init__(self, env: object, fail_at: int) -> None:
        self._env = env
        self.commits = 0
        self.fail_at = fail_at

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)

    def begin(self, *args: object, write: bool = False, **kwargs: object) -> object:
        txn = self._env.begin(*args, write=write, **kwargs)  # type: ignore[attr-defined]
        return _FailingTxn(txn, self) if write else txn


class _FailingTxn:
    def __init__(self, txn: object, env: _FailingCommits) -> None:
        self._txn = txn
        self._env = env

    def __getattr__(self, name: str) -> object:
        return getattr(self._txn, name)

    def commit(self) -> None:
        self._env.commits += 1
        if self._env.commits == self._env.fail_at:
            self._txn.abort()  # type: ignore[attr-defined]
            raise lmdb.DiskError("mdb_txn_commit: Input/output error")
        self._txn.commit()  # type: ignore[attr-defined]

    def __enter__(self) -> "_FailingTxn":
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.commit()
        else:
            self._txn.abort()  # type: ignore[attr-defined]


# An eviction's write commits: the hot-read watermark, the row marked evicting, the dropped
# manifests, the row deleted.
@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_eio_from_an_lmdb_commit_mid_eviction_is_finished_by_the_next_run(
        settings: Settings, fail_at: int) -> None:
    store, ids = _three_segments(settings)
    real_env = store.env
    faulty = store.env = _FailingCommits(real_env, fail_at)  # type: ignore[assignment]
    evictor = Evictor(store, capacity_bytes=250 * KIB)
    evictor.run_once()
    assert faulty.commits >= fail_at, "the fault was injected"
    store.env = real_env
    evictor.run_once()
    assert not present(store, "s1")
    assert not os.path.exists(segment_path(store.segments_dir, ids[0]))
    assert [seg for seg, _, _ in evictor._segments()] == ids[1:], "in order, s2 kept"
    assert present(store, "s2") and present(store, "s3")
    store.close()


def test_a_segment_that_keeps_failing_does_not_stop_eviction_for_good(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ids = _three_segments(settings)
    stuck = segment_path(store.segments_dir, ids[0])
    real_unlink = os.unlink

    def unlink(path: str | bytes | os.PathLike, *args: object, **kwargs: object) -> None:
        if os.fspath(path) == stuck:
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    evictor = Evictor(store, capacity_bytes=150 * KIB)
    for _ in range(MAX_ATTEMPTS - 1):  # a transient fault is retried in order first
        evictor.run_once()
        assert present(store, "s2")
    evictor.run_once()
    assert not present(store, "s2"), "past a few attempts, the next segments are evicted"
    store.close()


def test_an_unreadable_hot_artifact_is_dropped_instead_of_blocking_eviction(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ids = _three_segments(settings)
    evictor = Evictor(store, capacity_bytes=250 * KIB)
    evictor._update_hot_watermark(evictor._segments())
    store._hot_checked = 0  # re-read the watermark now
    assert store.read_bytes(store.lookup("gradle", "", "s1")) == b"s1" * 50 * KIB  # hot now
    store.flush_read_marks()
    bad = segment_path(store.segments_dir, ids[0])
    real_copy = os.copy_file_range

    def copy_file_range(src: int, *args: object, **kwargs: object) -> int:
        if os.readlink(f"/proc/self/fd/{src}") == bad:
            raise OSError(errno.EIO, "Input/output error")  # a bad sector under the old segment
        return real_copy(src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    evictor.run_once()
    assert not os.path.exists(bad)
    assert not present(store, "s1")
    assert present(store, "s2")
    store.close()


def _evict_and_crash_at_unlink(data_dir: str, victim: str) -> None:
    store = ArtifactStore(Settings(data_dir=data_dir, node_url="http://self:7443"))
    real_unlink = os.unlink

    def unlink(path: str | bytes | os.PathLike, *args: object, **kwargs: object) -> None:
        if os.fspath(path) == victim:
            os._exit(3)  # the process dies in the middle of the eviction
        real_unlink(path, *args, **kwargs)

    os.unlink = unlink  # type: ignore[assignment]
    Evictor(store, capacity_bytes=250 * KIB).run_once()
    os._exit(0)


def test_an_eviction_cut_by_a_crash_is_finished_after_the_restart(settings: Settings) -> None:
    store, ids = _three_segments(settings)
    victim = segment_path(store.segments_dir, ids[0])
    crashing = ctx.Process(target=_evict_and_crash_at_unlink, args=(settings.data_dir, victim))
    crashing.start()
    crashing.join(60)
    assert crashing.exitcode == 3
    Evictor(store, capacity_bytes=250 * KIB).run_once()  # the restarted replicator's evictor
    assert not os.path.exists(victim), "no segment file is left behind without its row"
    assert not present(store, "s1")
    assert present(store, "s2") and present(store, "s3")
    assert sorted(os.listdir(store.segments_dir)) == sorted(
        os.path.basename(segment_path(store.segments_dir, seg)) for seg in ids[1:])
    store.close()


def test_a_read_through_a_lookup_made_before_copy_forward_returns_the_copied_body(
        settings: Settings) -> None:
    """The segment of a looked-up artifact is evicted and the artifact copied forward to another
    offset before its body is read: the read follows it there (it used to read the new segment
    at the old offset, that is another artifact's bytes)."""
    store, ids = _three_segments(settings)
    evictor = Evictor(store, capacity_bytes=250 * KIB)
    evictor._update_hot_watermark(evictor._segments())
    store._hot_checked = 0  # re-read the watermark now
    located = store.lookup("gradle", "", "s1")
    assert store.read_bytes(located) == b"s1" * 50 * KIB  # hot now
    store.flush_read_marks()
    put(store, "s4", b"4" * KIB)  # the copy of s1 lands after it, not at s1's old offset 0
    evictor.run_once()
    assert not os.path.exists(segment_path(store.segments_dir, ids[0]))
    assert store.lookup("gradle", "", "s1").manifest.offset != located.manifest.offset
    assert store.read_bytes(located) == b"s1" * 50 * KIB
    store.close()
