"""Opening the node's LMDB environment (one per process, never across a fork)."""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import lmdb

DB_NAMES = (
    "manifests",      # artifact id (32 B) -> Manifest
    "inline",         # artifact id -> body bytes (keyvalue docs, action results)
    "ns_index",       # namespace key (16 B) + artifact id -> b""
    "ns_tombstones",  # namespace key -> JSON {"ns": namespace, "v": version_ms}
    "multipart",      # upload id -> JSON upload state
    "outbox",         # peer url + \0 + seq (8 B big-endian) -> JSON message
    "segments",       # segment id (8 B big-endian) -> JSON segment state
    "segment_index",  # segment id (8 B) + artifact id -> b""
    "hot",            # artifact id -> b"": read from an old segment, copy forward on eviction
    "meta",           # counters and node-wide values
)


@dataclass
class Databases:
    manifests: object
    inline: object
    ns_index: object
    ns_tombstones: object
    multipart: object
    outbox: object
    segments: object
    segment_index: object
    hot: object
    meta: object


def open_environment(data_dir: str, map_size: int) -> tuple[lmdb.Environment, Databases]:
    path = os.path.join(data_dir, "lmdb")
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=map_size, max_dbs=len(DB_NAMES) + 2, subdir=True,
                    lock=True, sync=True, metasync=True, readahead=False, max_readers=2048,
                    max_spare_txns=16)
    handles = {name: env.open_db(name.encode(), create=True) for name in DB_NAMES}
    return env, Databases(**handles)


def namespace_key(namespace_id: str) -> bytes:
    """Fixed-width LMDB key for a namespace (ids may be up to 1 KiB, LMDB keys 511 B, and "" is valid)."""
    return hashlib.sha256(namespace_id.encode()).digest()[:16]


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def from_u64(raw: bytes) -> int:
    return struct.unpack(">Q", raw)[0]


def next_counter(txn: lmdb.Transaction, meta_db: object, name: bytes) -> int:
    """Increment and return a counter kept in ``meta`` (caller holds the write txn)."""
    raw = txn.get(name, db=meta_db)
    value = (from_u64(raw) if raw else 0) + 1
    txn.put(name, u64(value), db=meta_db)
    return value


def add_counter(txn: lmdb.Transaction, meta_db: object, name: bytes, delta: int) -> int:
    raw = txn.get(name, db=meta_db)
    value = max(0, (from_u64(raw) if raw else 0) + delta)
    txn.put(name, u64(value), db=meta_db)
    return value


def read_counter(txn: lmdb.Transaction, meta_db: object, name: bytes) -> int:
    raw = txn.get(name, db=meta_db)
    return from_u64(raw) if raw else 0
