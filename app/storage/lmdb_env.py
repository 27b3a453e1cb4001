"""Opening the node's LMDB environment (one per process, never across a fork).

LMDB maps its files: ``data.mdb`` read-only (no ``writemap``: pages are written with
``pwrite``, so a full disk fails the commit instead of faulting a mapped page) and
``lock.mdb`` read-write (the reader table, created sparse): its pages are allocated
when the environment opens. Write transactions go through :func:`write_txn`, which
turns "the disk is full" into ``BudgetExhausted`` (429 / RESOURCE_EXHAUSTED) and returns
only once the commit is durable.

Durability: the environment runs with ``metasync`` off (``MDB_NOMETASYNC``). A commit
fdatasyncs its data pages and then writes its meta page without a sync, so LMDB's
integrity holds (a power loss can only roll back to the previous meta page) and the
commit is durable once anything fdatasyncs ``data.mdb`` after that meta write. Every
later commit, from any process of the node, does exactly that before its own meta
write; :func:`make_durable` therefore syncs only when no later commit has happened yet.
Concurrent committers across processes share these syncs (group commit at the file).
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import lmdb

from app import metrics
from app.storage.backpressure import raise_if_lmdb_full

log = logging.getLogger("kura.storage")

DB_NAMES = (
    "manifests",      # artifact id (32 B) -> Manifest
    "inline",         # artifact id -> body bytes (keyvalue docs, action results)
    "ns_index",       # namespace key (16 B) + artifact id -> b""
    "ns_tombstones",  # namespace key -> JSON {"ns": namespace, "v": version_ms}
    "multipart",      # upload id -> JSON upload state
    "partial_uploads",  # partial ByteStream upload file name -> JSON {"size", "ms"}
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
    partial_uploads: object
    outbox: object
    segments: object
    segment_index: object
    hot: object
    meta: object


# Counters in ``meta``: bytes held in the tmp dir between requests.
MULTIPART_BYTES = b"multipart_bytes"
PARTIAL_UPLOAD_BYTES = b"partial_upload_bytes"

MAX_READERS = 2048
# The size LMDB gives lock.mdb for MAX_READERS on 64-bit Linux: its header (MDB_txninfo,
# 192 bytes) and 64-byte reader slots, the first one inside the header.
_LOCK_FILE_BYTES = 192 + (MAX_READERS - 1) * 64


def open_environment(data_dir: str, map_size: int) -> tuple[lmdb.Environment, Databases]:
    path = os.path.join(data_dir, "lmdb")
    os.makedirs(path, exist_ok=True)
    _allocate_lock_file(os.path.join(path, "lock.mdb"))
    env = lmdb.open(path, map_size=map_size, max_dbs=len(DB_NAMES) + 2, subdir=True,
                    lock=True, sync=True, metasync=False, readahead=False, max_readers=MAX_READERS,
                    max_spare_txns=16, writemap=False)
    handles = {name: env.open_db(name.encode(), create=True) for name in DB_NAMES}
    return env, Databases(**handles)


def _allocate_lock_file(path: str) -> None:
    """Create the reader table allocated, before LMDB maps it (LMDB would create it sparse:
    a reader slot first used while the disk is full would be SIGBUS). LMDB keeps a larger
    file as it is. Done before the environment opens and skipped once allocated: closing a
    descriptor of lock.mdb would drop the fcntl locks LMDB holds on it in this process."""
    try:
        st = os.stat(path)
        if st.st_size >= _LOCK_FILE_BYTES and st.st_blocks * 512 >= st.st_size:
            return
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(_LOCK_FILE_BYTES, os.fstat(fd).st_size))
    except OSError as exc:
        log.warning("event=lmdb_lock_file_not_allocated path=%s error=%r", path, exc.strerror)
    finally:
        os.close(fd)


@contextmanager
def write_txn(env: lmdb.Environment, offload: Callable[..., object] | None = None, *,
              durable: bool = True) -> Iterator[lmdb.Transaction]:
    """``env.begin(write=True)`` whose commit fails with ``BudgetExhausted`` when the disk
    (or the LMDB map) is full; nothing of the transaction is kept then. Other errors pass.
    Returns once the commit is durable (``offload`` runs the sync when one is needed),
    unless ``durable`` is False: then the caller calls :func:`make_durable` with the
    transaction's ``id()`` before it reports the commit to anyone.
    Must not yield to another greenlet while it is open."""
    txn = env.begin(write=True)
    txn_id = txn.id()
    try:
        yield txn
    except BaseException as exc:
        txn.abort()
        raise_if_lmdb_full(env, exc)
        raise
    try:
        txn.commit()
    except lmdb.Error as exc:
        raise_if_lmdb_full(env, exc)
        raise
    if durable:
        make_durable(env, txn_id, offload)


def make_durable(env: lmdb.Environment, txn_id: int,
                 offload: Callable[..., object] | None = None) -> None:
    """Make the committed write transaction ``txn_id`` durable (see the module docstring)."""
    syncs = durable_syncs(env, txn_id, offload)
    if syncs:
        metrics.STORAGE_SYNCS.labels("lmdb").inc(syncs)


def durable_syncs(env: lmdb.Environment, txn_id: int,
                  offload: Callable[..., object] | None = None) -> int:
    """:func:`make_durable` without counting: returns how many fdatasyncs of ``data.mdb``
    made the commit durable (its own, and one for its meta page unless a later commit did
    that), for the caller to count where metrics may be recorded (not in a thread of
    gevent's pool)."""
    with env.begin() as txn:
        last = txn.id()  # the newest committed transaction of any process
    if last < txn_id:
        return 0  # the commit changed nothing: LMDB wrote and synced nothing
    if last > txn_id:
        return 1  # a later commit fdatasynced data.mdb after our meta page was written
    try:
        if offload is None:
            env.sync(True)
        else:
            offload(env.sync, True)
    except lmdb.Error as exc:
        raise_if_lmdb_full(env, exc)
        raise
    return 2


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
