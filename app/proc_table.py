"""The process table as Linux's /proc shows it: the one reader of ``/proc/<pid>/stat``."""
from __future__ import annotations

import os
from typing import Iterator


def pids() -> Iterator[int]:
    """Every process id listed right now (a process may be gone by the time it is read)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name — state(0) ppid(1) pgrp(2)
    session(3) ... utime(11) stime(12) cutime(13) cstime(14) — or None when the process is
    gone. The command name may contain spaces and parentheses: the split is after its last
    closing paren."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def cmdline(pid: int) -> str | None:
    """The process's command line, arguments joined by spaces; None when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def children(parent: int) -> list[int]:
    """Live child processes of ``parent``."""
    found = []
    for pid in pids():
        fields = stat_fields(pid)
        if fields is not None and int(fields[1]) == parent:
            found.append(pid)
    return found
