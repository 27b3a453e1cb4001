"""The storage operations replication and bootstrap use, against real LMDB and segments."""
from __future__ import annotations

import os

import pytest

from app.errors import BudgetExhausted
from app.members import write_members
from app.settings import Settings
from app.storage.store import (APPLIED, IGNORED_OLDER, IGNORED_STALE, IGNORED_TOMBSTONE,
                               ADOPT_MIN_BYTES, ArtifactStore, ReplicatedArtifact)


def put(store: ArtifactStore, key: str, data: bytes, ns: str = "") -> object:
    with store.stage() as staged:
        staged.write(data)
        staged.finish(expected_size=len(data))
        return store.put_staged("gradle", ns, key, staged)


def body(store: ArtifactStore, key: str, ns: str = "") -> bytes | None:
    located = store.lookup("gradle", ns, key)
    return None if located is None else store.read_bytes(located)


def version(key: str, data: bytes, v: int, origin: str = "http://peer:7443", ns: str = "",
            inline: bool = False) -> ReplicatedArtifact:
    return ReplicatedArtifact("gradle", ns, key, "application/octet-stream", v, origin, len(data),
                              inline, data)


def test_local_write_carries_this_node_as_origin(store: ArtifactStore) -> None:
    put(store, "k", b"v")
    assert store.lookup("gradle", "", "k").manifest.origin == "http://self:7443"


def test_replicated_write_is_last_writer_wins(store: ArtifactStore) -> None:
    local = put(store, "k", b"local")
    [stale] = store.apply_replicated([version("k", b"older", local.version_ms - 1)])
    assert stale.outcome == IGNORED_STALE and body(store, "k") == b"local"
    [fresh] = store.apply_replicated([version("k", b"newer", local.version_ms + 10)])
    assert fresh.outcome == APPLIED and body(store, "k") == b"newer"
    manifest = store.lookup("gradle", "", "k").manifest
    assert (manifest.version_ms, manifest.origin) == (local.version_ms + 10, "http://peer:7443")
    [again] = store.apply_replicated([version("k", b"newer", local.version_ms + 10)])
    assert again.outcome == IGNORED_STALE  # duplicate delivery is harmless


def test_same_millisecond_on_two_nodes_converges_by_origin(tmp_path) -> None:
    """Two nodes write one key in the same millisecond; each receives the other's write.
    Both must keep the same one (the higher origin), whatever the arrival order."""
    frozen = 1_700_000_000.0
    a = ArtifactStore(Settings(data_dir=str(tmp_path / "a"), node_url="http://a:7443"),
                      clock=lambda: frozen)
    b = ArtifactStore(Settings(data_dir=str(tmp_path / "b"), node_url="http://b:7443"),
                      clock=lambda: frozen)
    wa, wb = put(a, "k", b"from-a"), put(b, "k", b"from-b")
    assert wa.version_ms == wb.version_ms
    [on_a] = a.apply_replicated([version("k", b"from-b", wb.version_ms, "http://b:7443")])
    [on_b] = b.apply_replicated([version("k", b"from-a", wa.version_ms, "http://a:7443")])
    assert (on_a.outcome, on_b.outcome) == (APPLIED, IGNORED_STALE)
    assert body(a, "k") == body(b, "k") == b"from-b"
    a.close()
    b.close()


def test_replicated_write_older_than_tombstone_is_ignored(store: ArtifactStore) -> None:
    tomb = store.delete_namespace("ns")
    [result] = store.apply_replicated([version("k", b"zombie", tomb - 5, ns="ns")])
    assert result.outcome == IGNORED_TOMBSTONE
    [equal] = store.apply_replicated([version("k", b"zombie", tomb, ns="ns")])
    assert equal.outcome == IGNORED_TOMBSTONE
    assert store.lookup("gradle", "ns", "k") is None
    [newer] = store.apply_replicated([version("k", b"after", tomb + 1, ns="ns")])
    assert newer.outcome == APPLIED and body(store, "k", "ns") == b"after"


def test_replicated_namespace_delete(store: ArtifactStore) -> None:
    old = put(store, "old", b"1", ns="ns")
    assert store.apply_replicated_namespace_delete("ns", old.version_ms + 5) == APPLIED
    assert store.lookup("gradle", "ns", "old") is None
    assert store.apply_replicated_namespace_delete("ns", old.version_ms + 1) == IGNORED_OLDER
    [kept] = store.apply_replicated([version("new", b"2", old.version_ms + 6, ns="ns")])
    assert kept.outcome == APPLIED
    assert store.apply_replicated_namespace_delete("ns", old.version_ms + 6) == APPLIED
    assert store.lookup("gradle", "ns", "new") is None  # written at the tombstone's version


def test_replicated_writes_create_no_outbox_rows(settings: Settings) -> None:
    write_members(settings.resolved_run_dir, ["http://peer:7443"])
    store = ArtifactStore(settings)
    store.apply_replicated([version("k", b"v", 10)])
    store.apply_replicated_namespace_delete("ns", 20)
    assert store.outbox.depth() == 0
    put(store, "local", b"x")
    assert store.outbox.depth() == 1
    store.close()


def test_batch_applies_winners_and_skips_losers_in_one_commit(store: ArtifactStore) -> None:
    local = put(store, "kept", b"local")
    with store.stage(hashing=False) as staged:
        items = []
        for key, data, v in (("a", b"alpha", 5), ("kept", b"older", local.version_ms - 1),
                             ("b", b"", 7), ("c", b"gamma" * 100, 9)):
            offset = staged.size
            staged.write(data)
            items.append(ReplicatedArtifact("gradle", "", key, "application/octet-stream", v,
                                            "http://p:1", len(data), False, (staged.fd, offset)))
        staged.finish()
        results = store.apply_replicated(items, staged=staged)
    assert [r.outcome for r in results] == [APPLIED, IGNORED_STALE, APPLIED, APPLIED]
    assert (body(store, "a"), body(store, "kept"), body(store, "b"), body(store, "c")) == \
        (b"alpha", b"local", b"", b"gamma" * 100)


def test_large_batch_becomes_a_segment_without_a_copy(store: ArtifactStore) -> None:
    big = os.urandom(ADOPT_MIN_BYTES + 1234)
    segments_before = store.stats()["segments"]
    with store.stage(hashing=False) as staged:
        staged.write(big)
        staged.finish()
        [result] = store.apply_replicated(
            [ReplicatedArtifact("gradle", "", "big", "x", 3, "o", len(big), False, (staged.fd, 0))],
            staged=staged)
    assert result.applied and body(store, "big") == big
    located = store.lookup("gradle", "", "big")
    assert located.manifest.offset == 0 and store.stats()["segments"] == segments_before + 1


def test_inline_versions_stay_inline(store: ArtifactStore) -> None:
    doc = b'{"entries":[{"value":"x"}]}'
    [result] = store.apply_replicated([ReplicatedArtifact("xcode", "", "action_cache/a", "application/json",
                                                          4, "o", len(doc), True, doc)])
    located = store.lookup("xcode", "", "action_cache/a")
    assert result.applied and located.manifest.inline and located.inline_body == doc


def test_outbox_rows_go_to_published_members_only(settings: Settings) -> None:
    store = ArtifactStore(settings)
    put(store, "before", b"v")
    assert store.outbox.depth() == 0  # no members yet: a joining peer bootstraps instead
    write_members(settings.resolved_run_dir, ["http://a:7443", "http://b:7443", "http://self:7443"])
    store._members._checked = -1.0  # re-read now instead of within RECHECK_S
    put(store, "k", b"v")
    store.delete_namespace("ns")
    assert store.outbox.depth() == 4  # 2 peers (self excluded) x 2 changes
    rows = store.outbox.peek("http://a:7443")
    assert [r[1]["op"] for r in rows] == ["put", "delete_ns"]
    assert rows[0][1]["aid"] == store.artifact_id("gradle", "", "k").hex()
    assert store.outbox.peek("http://self:7443") == []
    store.close()


def test_outbox_is_read_a_window_at_a_time_and_completed_in_batches(settings: Settings) -> None:
    write_members(settings.resolved_run_dir, ["http://a:7443"])
    store = ArtifactStore(settings)
    for i in range(25):
        put(store, f"k{i}", b"v")
    first = store.outbox.peek("http://a:7443", 10)
    second = store.outbox.peek("http://a:7443", 10, after=first[-1][0])
    assert len(first) == len(second) == 10 and first[-1][0] < second[0][0]
    store.outbox.complete_many([key for key, _ in first + second])
    assert store.outbox.depth() == 5
    assert store.outbox.last_seq() == 25
    store.close()


def test_outbox_over_max_depth_rejects_writes_without_partial_state(settings: Settings) -> None:
    write_members(settings.resolved_run_dir, ["http://a:7443"])
    store = ArtifactStore(settings.with_overrides(outbox_max_depth=2))
    put(store, "k1", b"1")
    put(store, "k2", b"2")
    with pytest.raises(BudgetExhausted, match="KURA_OUTBOX_MAX_DEPTH"):
        store.check_write_budget()
    with pytest.raises(BudgetExhausted):
        put(store, "k3", b"3")
    assert store.lookup("gradle", "", "k3") is None
    store.close()


def test_catalog_pages_digests_and_tombstones(tmp_path) -> None:
    a = ArtifactStore(Settings(data_dir=str(tmp_path / "a"), node_url="http://a:7443"))
    b = ArtifactStore(Settings(data_dir=str(tmp_path / "b"), node_url="http://b:7443"))
    for i in range(300):
        put(a, f"k{i}", f"v{i}".encode())
    put(a, "gone", b"x", ns="cleaned")
    a.delete_namespace("cleaned")
    # Pages cover every visible artifact exactly once, in id order.
    seen, after = [], None
    while True:
        entries, after = a.catalog.manifests_page(after, 64)
        seen.extend(e.artifact_id for e in entries)
        if after is None:
            break
    assert len(seen) == 300 and seen == sorted(seen)
    some_prefix = seen[0][:2]
    entries, _ = a.catalog.manifests_page(None, 1000, some_prefix)
    assert entries and all(e.artifact_id.startswith(some_prefix) for e in entries)
    # b copies everything: its digests then equal a's bucket by bucket.
    digests_a = a.catalog.bucket_digests(3)
    assert sum(d["count"] for d in digests_a.values()) == 300
    entries, _ = a.catalog.manifests_page(None, 1000)
    b.apply_replicated([ReplicatedArtifact(e.manifest.producer, e.manifest.namespace_id, e.manifest.key,
                                           e.manifest.content_type, e.manifest.version_ms,
                                           e.manifest.origin, e.manifest.size, e.manifest.inline,
                                           a.read_bytes(a.lookup_id(bytes.fromhex(e.artifact_id))))
                        for e in entries])
    assert b.catalog.bucket_digests(3) == digests_a
    # One newer version on b makes exactly one bucket differ.
    entry = entries[7]
    b.apply_replicated([ReplicatedArtifact("gradle", "", entry.manifest.key, "x", entry.manifest.version_ms + 1,
                                           "http://b:7443", 1, False, b"z")])
    diff = {k for k in digests_a if b.catalog.bucket_digests(3).get(k) != digests_a[k]}
    assert diff == {entry.artifact_id[:3]}
    rows, after = a.catalog.tombstones_page(None, 10)
    assert [r["namespace_id"] for r in rows] == ["cleaned"] and after is None
    a.close()
    b.close()
