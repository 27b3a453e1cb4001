"""Process-tree accounting from /proc: CPU seconds of a server and RSS of its workers.

CPU of a tree = utime+stime+cutime+cstime summed over the live processes under a
root. cutime/cstime only hold children that were already reaped (and so are no
longer in the tree), so nothing is counted twice.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field

from app import proc_table
from app.port_guard import listeners, socket_inodes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid in proc_table.pids():
        fields = proc_table.stat_fields(pid)
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    total = 0
    for pid in descendants(root):
        fields = proc_table.stat_fields(pid)
        if fields is None:
            continue
        # After the paren: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def holds_listener(pid: int, port: int) -> bool:
    """True if ``pid`` has a file descriptor on the listening socket of ``port``."""
    return not socket_inodes(pid).isdisjoint(item.inode for item in listeners(port))


def http_workers(master: int, http_port: int, other_ports: tuple[int, ...] = ()) -> list[int]:
    """Children of a gunicorn master that serve ``http_port`` (and none of ``other_ports``)."""
    workers = []
    for pid in descendants(master):
        if pid == master or not holds_listener(pid, http_port):
            continue
        if any(holds_listener(pid, port) for port in other_ports):
            continue
        workers.append(pid)
    return workers


@dataclass
class RssSampler:
    """Samples VmRSS of a fixed set of pids at ``hz`` on a thread; keeps baseline and peak."""

    pids: list[int]
    hz: float = 20.0
    baseline: dict[int, int] = field(default_factory=dict)
    peak: dict[int, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.baseline = {pid: rss_bytes(pid) for pid in self.pids}
        self.peak = dict(self.baseline)
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = 1.0 / self.hz
        while not self._stop.wait(interval):
            for pid in self.pids:
                value = rss_bytes(pid)
                if value > self.peak.get(pid, 0):
                    self.peak[pid] = value
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def growth(self) -> dict[int, int]:
        return {pid: self.peak.get(pid, 0) - self.baseline.get(pid, 0) for pid in self.pids}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free ports, held open together so none is handed out twice."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for_port(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
