"""The node's per-run directory: every file the node memory-maps lives here.

Touching a new page of a memory-mapped file on a filesystem that is full kills the
process (SIGBUS) instead of failing a write. So the shared node state
(``app.node_state``) and the Prometheus multiprocess files live on a memory
filesystem of their own, never on the data disk that fills up with artifacts: by
default ``/dev/shm/kura-<id of the data directory>``, or ``KURA_RUN_DIR``. The files
in it also reserve their pages before touching them (``posix_fallocate``), so even
this directory filling up is an error, not a signal.

The gunicorn master owns it: it creates it and removes what a previous run left
(one name per data directory, so a crashed run's files are reclaimed by the next
start rather than leaking memory), checks that it has room for the node's
processes, hands it to every process it starts, and removes it at exit. Only the
files the node creates are ever removed, so ``KURA_RUN_DIR`` may be a mount point.
"""
from __future__ import annotations

import hashlib
import os
import shutil

DEFAULT_PARENT = "/dev/shm"
NODE_STATE = "node-state"
PROMETHEUS = "prometheus"
MEMBERS = "members.json"  # the mesh members the replicator publishes (app.members)
MESH = "mesh.json"  # the replicator's mesh snapshot for the probes (app.replication.readiness)
# A process's Prometheus files use a few tens of KiB (measured: 16-56 KiB after mixed
# traffic); the node state is 4 KiB. Generous, so that a start that passes never runs short.
BASE_BYTES = 1024 * 1024
BYTES_PER_PROCESS = 256 * 1024


class RunDirError(Exception):
    """The per-run directory cannot be used; the message says why and what to set."""


def default_run_dir(data_dir: str) -> str:
    """``/dev/shm/kura-<16 hex digits of the data directory's real path>``."""
    ident = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:16]
    return os.path.join(DEFAULT_PARENT, f"kura-{ident}")


def prometheus_dir(run_dir: str) -> str:
    return os.path.join(run_dir, PROMETHEUS)


def required_bytes(processes: int) -> int:
    return BASE_BYTES + processes * BYTES_PER_PROCESS


def prepare(run_dir: str, *, processes: int, data_dir: str, tmp_dir: str) -> None:
    """Create ``run_dir`` empty of this node's files, or raise :class:`RunDirError`: it cannot
    be created, it shares a filesystem with the data or tmp directory (which fill with
    artifacts), or it has less room than ``processes`` need."""
    hint = "set KURA_RUN_DIR to a directory on a memory filesystem (tmpfs) of its own"
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory {run_dir}: {exc.strerror}; {hint}") from exc
    device = os.stat(run_dir).st_dev
    for name, path in (("KURA_DATA_DIR", data_dir), ("KURA_TMP_DIR", tmp_dir)):
        if os.stat(_existing(path)).st_dev == device:
            raise RunDirError(
                f"the run directory {run_dir} is on the same filesystem as {name} ({path}): its "
                f"memory-mapped files would crash the node when artifacts fill that disk; {hint}")
    wipe(run_dir)
    stats = os.statvfs(run_dir)
    free, needed = stats.f_bavail * stats.f_frsize, required_bytes(processes)
    if free < needed:
        raise RunDirError(
            f"the run directory {run_dir} has {free // 1024} KiB free, {processes} processes need "
            f"{needed // 1024} KiB; give it a larger memory filesystem (docker run --shm-size, a "
            f"Kubernetes emptyDir with medium: Memory) or {hint}")
    os.makedirs(prometheus_dir(run_dir), mode=0o700)


def _existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists (where it will be created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def wipe(run_dir: str) -> None:
    """Remove the files a run of the node creates in ``run_dir`` (and nothing else)."""
    shutil.rmtree(prometheus_dir(run_dir), ignore_errors=True)
    stale_temporaries = [n for n in _listdir(run_dir) if n.startswith((MEMBERS + ".", MESH + "."))]
    for name in (NODE_STATE, MEMBERS, MESH, *stale_temporaries):
        try:
            os.unlink(os.path.join(run_dir, name))
        except FileNotFoundError:
            pass


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def remove(run_dir: str) -> None:
    """Wipe ``run_dir`` and remove it if nothing else is in it (the master, at exit)."""
    wipe(run_dir)
    try:
        os.rmdir(run_dir)
    except OSError:
        pass  # a mount point, or files that are not ours
