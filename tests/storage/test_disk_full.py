"""A full disk is backpressure (BudgetExhausted: 429 / RESOURCE_EXHAUSTED), never an OSError
or an LMDB error that would become a 500; nothing partial is kept and writing resumes once
space is freed. The state files the replicator publishes on the data disk are written again
once it can. Real tmpfs filesystems filled with a ballast file, real LMDB."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from app.errors import BudgetExhausted
from app.members import MembersPublisher, read_members
from app.node_state import NodeState
from app.replication.readiness import MeshState, Publisher, read_snapshot
from app.settings import Settings
from app.storage.multipart import MultipartUploads
from app.storage.store import ArtifactStore
from tests.tmpfs import fill, tmpfs

MIB = 1024 * 1024


@pytest.fixture
def small_tmp(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "tmp", 4 * MIB) as mount:
        yield mount


@pytest.fixture
def tmp_on_tmpfs(tmp_path: Path, small_tmp: Path) -> Iterator[ArtifactStore]:
    """A store whose KURA_TMP_DIR is a small tmpfs (the data directory has room)."""
    store = ArtifactStore(Settings(data_dir=str(tmp_path / "data"), tmp_dir=str(small_tmp),
                                   node_url="http://self:7443"))
    yield store
    store.close()


def test_staging_into_a_full_tmp_dir_is_backpressure_and_closes_cleanly(
        tmp_on_tmpfs: ArtifactStore, small_tmp: Path) -> None:
    store = tmp_on_tmpfs
    ballast = fill(small_tmp, leave_bytes=256 * 1024)
    with pytest.raises(BudgetExhausted, match="disk is full"):
        with store.stage() as staged:
            for _ in range(256):  # small chunks, as a slow client or a chunked upload sends them
                staged.write(os.urandom(4096))  # fails part way; closing must not fail again
    assert store.staging.used_bytes() == 0

    ballast.unlink()
    with store.stage() as staged:
        staged.write(os.urandom(MIB))
        staged.finish(expected_size=MIB)
        store.put_staged("gradle", "", "k", staged)
    assert store.lookup("gradle", "", "k").size == MIB


def test_multipart_part_copied_into_a_full_tmp_dir_is_backpressure(
        tmp_on_tmpfs: ArtifactStore, small_tmp: Path) -> None:
    store = tmp_on_tmpfs
    uploads = MultipartUploads(store)
    upload_id = uploads.start("module", "", "builds/abc/Mod")
    part = os.urandom(MIB)
    with store.stage() as staged:
        staged.write(part)
        staged.finish(expected_size=len(part))
        ballast = fill(small_tmp)  # the part is staged; its copy into the upload has no room
        with pytest.raises(BudgetExhausted, match="disk is full"):
            uploads.put_part(upload_id, 1, staged)
    assert os.listdir(store.multipart_dir) == []  # no partial part file
    assert uploads.get(upload_id).parts == {}

    ballast.unlink()
    with store.stage() as staged:
        staged.write(part)
        staged.finish(expected_size=len(part))
        uploads.put_part(upload_id, 1, staged)
    uploads.complete(upload_id, [1])
    assert store.read_bytes(store.lookup("module", "", "builds/abc/Mod")) == part


@pytest.fixture
def data_on_tmpfs(tmp_path: Path) -> Iterator[tuple[ArtifactStore, Path]]:
    """A store whose data directory is a small tmpfs (staging elsewhere)."""
    with tmpfs(tmp_path / "disk", 8 * MIB) as disk:
        store = ArtifactStore(Settings(data_dir=str(disk / "data"), tmp_dir=str(tmp_path / "tmp"),
                                       node_url="http://self:7443"))
        yield store, disk
        store.close()


def test_lmdb_commit_on_a_full_disk_is_backpressure(data_on_tmpfs: tuple[ArtifactStore, Path]) -> None:
    store, disk = data_on_tmpfs
    store.put_bytes("keyvalue", "", "before", b"kept")
    ballast = fill(disk)
    # An inline value of this size needs new pages in the LMDB file: the commit cannot write them.
    with pytest.raises(BudgetExhausted, match="disk is full"):
        store.put_bytes("keyvalue", "", "big", os.urandom(512 * 1024))
    assert store.lookup("keyvalue", "", "big") is None
    assert store.lookup("keyvalue", "", "before").inline_body == b"kept"  # reads go on

    ballast.unlink()
    store.put_bytes("keyvalue", "", "big", b"x" * 512 * 1024)
    assert store.lookup("keyvalue", "", "big").size == 512 * 1024


def test_segment_append_on_a_full_disk_is_backpressure_and_leaves_no_gap(
        data_on_tmpfs: tuple[ArtifactStore, Path]) -> None:
    store, disk = data_on_tmpfs
    store.put_bytes("gradle", "", "before", b"a" * 1000, inline=False)
    ballast = fill(disk)
    for _ in range(3):
        with pytest.raises(BudgetExhausted, match="disk is full"):
            store.put_bytes("gradle", "", "big", os.urandom(MIB), inline=False)
    assert store.read_bytes(store.lookup("gradle", "", "before")) == b"a" * 1000

    ballast.unlink()
    store.put_bytes("gradle", "", "big", b"b" * MIB, inline=False)
    located = store.lookup("gradle", "", "big")
    assert store.read_bytes(located) == b"b" * MIB
    assert located.manifest.offset == 1000  # failed appends did not leave holes behind


def test_the_members_file_is_written_again_after_a_full_disk(tmp_path: Path) -> None:
    """The replicator publishes the mesh members for every writer; a failed write (a full
    run directory) leaves the old list, no temporary file, and is retried at the next round."""
    with tmpfs(tmp_path / "data", MIB) as data:
        publisher = MembersPublisher(str(data))
        publisher.publish(["http://a:7443"])
        ballast = fill(data)
        publisher.publish(["http://a:7443", "http://b:7443"])  # no room: not raised
        assert read_members(str(data)) == ["http://a:7443"]
        assert sorted(os.listdir(data)) == ["ballast", "members.json"]
        ballast.unlink()
        publisher.publish(["http://a:7443", "http://b:7443"])  # unchanged since, written now
        assert read_members(str(data)) == ["http://a:7443", "http://b:7443"]


def test_the_mesh_snapshot_is_written_again_after_a_full_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "data", MIB) as data:
        node_state = NodeState(str(tmp_path / "node-state"))
        mesh = MeshState("http://self:7443", settle_s=0.0)
        publisher = Publisher(mesh, node_state, str(data))
        ballast = fill(data)
        publisher.publish()  # no room: not raised, the node state is published all the same
        assert read_snapshot(str(data)) == {}
        assert os.listdir(data) == ["ballast"]  # no temporary file left
        ballast.unlink()
        publisher.publish()
        assert read_snapshot(str(data))["generation"] == mesh.generation
        node_state.close()
