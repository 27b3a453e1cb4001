"""ArtifactStore against real LMDB and segment files in a temp dir."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import time

import pytest

from app.errors import BudgetExhausted, DigestMismatch, NotFound, TooLarge, TruncatedBody
from app.members import write_members
from app.settings import Settings
from app.storage.eviction import Evictor
from app.storage.keys import artifact_id
from app.storage.store import ArtifactStore


def put(store: ArtifactStore, key: str, data: bytes, producer: str = "gradle", ns: str = "") -> object:
    with store.stage() as staged:
        staged.write(data)
        staged.finish(expected_size=len(data))
        return store.put_staged(producer, ns, key, staged)


def body(store: ArtifactStore, key: str, producer: str = "gradle", ns: str = "") -> bytes | None:
    located = store.lookup(producer, ns, key)
    if located is None:
        return None
    return store.read_bytes(located)


def test_artifact_id_is_sha256_of_producer_tenant_namespace_key() -> None:
    expected = hashlib.sha256(b"xcode\0acme\0proj\0blob/abc").digest()
    assert artifact_id("xcode", "acme", "proj", "blob/abc") == expected


def test_round_trip_and_overwrite_bumps_version(store: ArtifactStore) -> None:
    first = put(store, "k", b"one")
    second = put(store, "k", b"two!")
    assert first.created and not second.created
    assert second.version_ms > first.version_ms
    assert body(store, "k") == b"two!"
    assert store.lookup("gradle", "", "k").manifest.size == 4


def test_local_write_in_same_millisecond_after_clean_survives(settings: Settings) -> None:
    frozen = time.time()
    store = ArtifactStore(settings, clock=lambda: frozen)
    put(store, "k", b"old")
    store.delete_namespace("")
    assert body(store, "k") is None
    put(store, "k", b"new")  # same clock value as the tombstone
    assert body(store, "k") == b"new"
    store.close()


def test_namespace_clean_removes_only_that_namespace(store: ArtifactStore) -> None:
    for i in range(30):
        put(store, f"a{i}", b"x", ns="one")
        put(store, f"b{i}", b"y", ns="two")
    store.delete_namespace("one")
    assert all(store.lookup("gradle", "one", f"a{i}") is None for i in range(30))
    assert all(body(store, f"b{i}", ns="two") == b"y" for i in range(30))
    assert list(store.iter_namespace("one")) == []
    assert store.stats()["artifacts"] == 30


def test_tmp_budget_rejects_and_releases(settings: Settings) -> None:
    store = ArtifactStore(settings.with_overrides(tmp_dir_max_bytes=3 * 1024 * 1024))
    with store.stage() as staged:
        staged.write(b"a" * (2 * 1024 * 1024))
        with pytest.raises(BudgetExhausted, match="KURA_TMP_DIR_MAX_BYTES"):
            with store.stage() as other:
                other.write(b"b" * (2 * 1024 * 1024))
    assert store.staging.used_bytes() == 0
    put(store, "fits", b"c" * (2 * 1024 * 1024))
    store.close()


def test_staged_body_verification(store: ArtifactStore) -> None:
    with store.stage() as staged:
        staged.write(b"abc")
        with pytest.raises(TruncatedBody):
            staged.finish(expected_size=10)
    with store.stage() as staged:
        staged.write(b"abc")
        with pytest.raises(DigestMismatch):
            staged.finish(expected_size=3, expected_hash="0" * 64)
    with store.stage(limit=2) as staged:
        with pytest.raises(TooLarge):
            staged.write(b"abc")


def test_segments_rotate_at_max_size(settings: Settings) -> None:
    store = ArtifactStore(settings.with_overrides(segment_max_bytes=100_000))
    for i in range(10):
        put(store, f"k{i}", bytes([i]) * 30_000)
    segments = sorted(os.listdir(store.segments_dir))
    assert len(segments) >= 4
    assert all(os.path.getsize(os.path.join(store.segments_dir, s)) <= 100_000 for s in segments)
    assert all(body(store, f"k{i}") == bytes([i]) * 30_000 for i in range(10))
    store.close()


def test_eviction_drops_oldest_segment_but_copies_forward_what_was_read(settings: Settings) -> None:
    store = ArtifactStore(settings.with_overrides(segment_max_bytes=64 * 1024))
    for i in range(12):
        put(store, f"k{i}", bytes([i]) * 40_000)  # one artifact per segment
    evictor = Evictor(store, capacity_bytes=6 * 40_000)
    evictor._update_hot_watermark(evictor._segments())
    store._hot_checked = 0  # re-read the watermark now
    assert body(store, "k0") == bytes([0]) * 40_000  # read from the oldest segment: hot
    store.flush_read_marks()
    evicted = evictor.run_once()
    assert evicted >= 6
    assert evictor.used_bytes() <= 6 * 40_000
    assert body(store, "k0") == bytes([0]) * 40_000, "hot artifact must survive eviction"
    assert store.lookup("gradle", "", "k1") is None, "cold oldest artifact is evicted"
    assert body(store, "k11") == bytes([11]) * 40_000
    store.close()


def test_read_many_reads_each_segment_once_and_follows_eviction(settings: Settings) -> None:
    """Batch reads (BatchReadBlobs): bodies located before an eviction are still served
    when they were copied forward, NotFound in their place when they are gone."""
    store = ArtifactStore(settings.with_overrides(segment_max_bytes=64 * 1024))
    for i in range(12):
        put(store, f"k{i}", bytes([i]) * 40_000)  # one artifact per segment
    store.put_bytes("gradle", "", "small", b"inline body")
    keys = ["k0", "k1", "small", "k11", "absent"]
    located = store.lookup_many("gradle", "", keys)
    assert located[4] is None and located[2].inline_body == b"inline body"
    assert store.read_many(located[:4]) == [bytes([0]) * 40_000, bytes([1]) * 40_000,
                                            b"inline body", bytes([11]) * 40_000]

    evictor = Evictor(store, capacity_bytes=6 * 40_000)
    evictor._update_hot_watermark(evictor._segments())
    store._hot_checked = 0
    assert body(store, "k0") == bytes([0]) * 40_000  # hot: copied forward by the eviction
    store.flush_read_marks()
    assert evictor.run_once() >= 6
    k0, k1, small, k11 = store.read_many(located[:4])
    assert (k0, small, k11) == (bytes([0]) * 40_000, b"inline body", bytes([11]) * 40_000)
    assert isinstance(k1, NotFound)
    store.close()


def test_reads_are_not_tracked_while_far_below_capacity(settings: Settings) -> None:
    store = ArtifactStore(settings.with_overrides(segment_max_bytes=64 * 1024))
    for i in range(3):
        put(store, f"k{i}", bytes([i]) * 40_000)
    evictor = Evictor(store, capacity_bytes=10 * 1024 * 1024)
    evictor.run_once()
    store._hot_checked = 0
    assert body(store, "k0") is not None
    store.flush_read_marks()
    with store.env.begin() as txn:
        assert txn.stat(store.dbs.hot)["entries"] == 0
    store.close()


def _writer(data_dir: str, prefix: str, count: int) -> None:
    store = ArtifactStore(Settings(data_dir=data_dir, node_url="http://self:7443"))
    for i in range(count):
        put(store, f"{prefix}{i}", f"{prefix}{i}".encode() * 100)
    store.close()


def test_concurrent_writers_from_two_processes(settings: Settings) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(settings.data_dir, p, 200)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ArtifactStore(settings)
    for p in ("a", "b"):
        for i in range(200):
            assert body(store, f"{p}{i}") == f"{p}{i}".encode() * 100
    assert len(os.listdir(store.segments_dir)) == 2  # one active segment per process
    store.close()


def test_multipart_janitor_expires_abandoned_uploads(settings: Settings) -> None:
    from app.storage.multipart import MultipartUploads

    now = [1_000_000.0]
    store = ArtifactStore(settings, clock=lambda: now[0])
    uploads = MultipartUploads(store)
    upload_id = uploads.start("module", "", "builds/h/n")
    with store.stage() as staged:
        staged.write(b"p" * 1000)
        staged.finish()
        uploads.put_part(upload_id, 1, staged)
    assert store.staging.used_bytes() == 1000
    assert uploads.expire(older_than_ms=store.now_ms() - 1000) == 0
    now[0] += 2 * 24 * 3600
    assert uploads.expire(older_than_ms=store.now_ms() - settings.multipart_upload_ttl_ms) == 1
    assert os.listdir(store.multipart_dir) == []
    assert store.staging.used_bytes() == 0
    store.close()


def test_empty_body_is_stored_inline(store: ArtifactStore) -> None:
    put(store, "empty", b"")
    located = store.lookup("gradle", "", "empty")
    assert located.inline_body == b"" and located.size == 0


def test_put_many_publishes_a_batch_with_one_append(settings: Settings) -> None:
    write_members(settings.resolved_run_dir, ["http://a:7443"])
    store = ArtifactStore(settings)
    items = [(f"blob/{i}", bytes([i]) * (i + 1)) for i in range(50)] + [("blob/empty", b"")]
    results = store.put_many("reapi", "default", items)
    assert all(r.created for r in results)
    for key, data in items:
        located = store.lookup("reapi", "default", key)
        assert store.read_bytes(located) == data
    assert len(os.listdir(store.segments_dir)) == 1
    assert store.outbox.depth() == len(items)
    again = store.put_many("reapi", "default", items[:2])
    assert not any(r.created for r in again)
    store.close()


def test_read_many_of_bodies_stored_back_to_back(settings: Settings,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch written together is read back with few preads, whatever the order asked,
    with repeats, bounded runs and bodies from other writes in between."""
    import app.storage.store as store_module

    monkeypatch.setattr(store_module, "MAX_READ_RUN_BYTES", 100)
    store = ArtifactStore(settings)
    first = [(f"a{i}", bytes([i]) * (10 + i)) for i in range(12)]
    store.put_many("reapi", "default", first)
    store.put_many("reapi", "default", [("b", b"between")])
    store.put_many("reapi", "default", [("c", b"c" * 30)])
    keys = ["c", "a3", "a0", "b", "a11", "a3", "a1", "a2"] + [key for key, _ in first[4:11]]
    located = store.lookup_many("reapi", "default", keys)
    expected = {key: data for key, data in first} | {"b": b"between", "c": b"c" * 30}
    assert store.read_many(located) == [expected[key] for key in keys]
    store.close()


def test_large_body_becomes_its_own_segment_without_a_copy(store: ArtifactStore) -> None:
    from app.storage.store import ADOPT_MIN_BYTES

    data = os.urandom(ADOPT_MIN_BYTES + 123)
    put(store, "small", b"s" * 100)
    put(store, "large", data)
    located = store.lookup("gradle", "", "large")
    assert located.manifest.offset == 0
    path = os.path.join(store.segments_dir, f"{located.manifest.segment_id:016x}.seg")
    assert os.path.getsize(path) == len(data)
    assert store.read_bytes(located) == data
    assert os.listdir(store.staging.directory) == []
    assert store.staging.used_bytes() == 0


def test_eviction_also_keeps_a_free_space_reserve(settings: Settings) -> None:
    store = ArtifactStore(settings.with_overrides(segment_max_bytes=64 * 1024))
    for i in range(4):
        put(store, f"k{i}", bytes([i]) * 40_000)
    evictor = Evictor(store, capacity_bytes=10 * 1024 ** 3)  # capacity far away
    evictor.min_free_bytes = 1 << 62  # ... but the disk is short of its reserve
    assert evictor.run_once() >= 1
    assert store.lookup("gradle", "", "k0") is None
    store.close()


def test_outbox_rows_complete_and_drop_per_peer(settings: Settings) -> None:
    write_members(settings.resolved_run_dir, ["http://a:7443", "http://b:7443"])
    store = ArtifactStore(settings)
    for i in range(3):
        put(store, f"k{i}", b"v")
    assert sorted(store.outbox.peers_with_rows()) == ["http://a:7443", "http://b:7443"]
    first_key, _ = store.outbox.peek("http://a:7443", limit=1)[0]
    store.outbox.complete(first_key)
    assert len(store.outbox.peek("http://a:7443")) == 2
    assert store.outbox.drop_peer("http://b:7443") == 3
    assert list(store.outbox.peers_with_rows()) == ["http://a:7443"]
    assert store.outbox.depth() == 2
    store.close()


def test_kept_headers_are_part_of_the_version(store: ArtifactStore) -> None:
    from app.storage.manifest import Manifest

    kept = (("x-artifact-duration", "9"), ("x-artifact-tag", "dGFn"))
    for size in (10, 9 * 1024 * 1024):  # appended to a segment, and a staged file adopted whole
        with store.stage() as staged:
            staged.write(b"t" * size)
            staged.finish(expected_size=size)
            store.put_staged("turbo", "web", f"h{size}", staged, headers=kept)
        located = store.lookup("turbo", "web", f"h{size}")
        assert located is not None and located.manifest.headers == kept
        assert Manifest.decode(located.manifest.encode()) == located.manifest
    # A manifest without headers encodes as before (nodes of the previous release read it).
    plain = Manifest("gradle", "", "k", "x/y", 5, 1, 3, 0, "http://o")
    assert b'"h"' not in plain.encode() and Manifest.decode(plain.encode()).headers == ()
