"""The guard that lets a node's REAPI processes share the gRPC port, and nobody else.

Several REAPI processes (``KURA_GRPC_WORKERS``) each bind the gRPC port with
SO_REUSEPORT (grpcio cannot take over a listening socket it did not create, so the
master cannot bind one and hand it out). The kernel then spreads new connections over
every socket bound to that address with SO_REUSEPORT, and what it enforces is only
that they all belong to the same effective UID: a process of another user can never
join, but a second node run by the same user (two nodes in one container, a test
machine) would silently take a share of the traffic.

So the node checks, from ``/proc``, who listens on its port:

- the master refuses to start (exit status 1) when anything already listens on an
  address its gRPC port would overlap (``foreign_listeners`` before any child exists);
- each REAPI process checks before it binds and again right after: every listening
  socket on the port must be held by a child of its own master (its siblings and
  itself). Otherwise it closes its server and exits 1 (two nodes starting at the same
  moment both see each other and both refuse, rather than both serving half the calls).

A single REAPI process (``KURA_GRPC_WORKERS=1`` or ``python -m app.reapi`` run alone)
binds without SO_REUSEPORT, and the kernel alone keeps the port exclusive.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from app import proc_table

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}
TABLES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket of this network namespace."""

    address: IpAddress
    port: int
    inode: int


def _address(hex_address: str, family: int) -> IpAddress:
    raw = bytes.fromhex(hex_address)
    # The kernel prints the address as 32-bit words in host (little-endian) order.
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(socket.inet_ntop(family, packed))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def listeners(port: int) -> list[Listener]:
    """Every socket listening on TCP ``port`` (any address), from ``/proc/net/tcp{,6}``."""
    found = []
    for table, family in TABLES:
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    hex_address, hex_port = local.rsplit(":", 1)
                    if state == LISTEN and int(hex_port, 16) == port:
                        found.append(Listener(_address(hex_address, family), port, int(inode)))
        except OSError:
            continue  # no IPv6 in this kernel
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` holds open (empty if it is gone or not ours to read)."""
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def bind_addresses(host: str, port: int) -> set[IpAddress]:
    """The addresses a server bound to ``host`` listens on."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    return {ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos}


def _overlaps(address: IpAddress, ours: set[IpAddress]) -> bool:
    # A wildcard socket takes the connections of every address of the port (both
    # families when it is IPv6 and not v6-only): treat it as overlapping everything.
    return address.is_unspecified or address in ours or any(a.is_unspecified for a in ours)


def foreign_listeners(host: str, port: int, parent: int) -> list[Listener]:
    """Sockets listening on an address of ``host:port`` that no child of ``parent`` holds."""
    ours = bind_addresses(host, port)
    overlapping = [item for item in listeners(port) if _overlaps(item.address, ours)]
    if not overlapping:
        return []
    owned: set[int] = set()
    for pid in proc_table.children(parent):
        owned |= socket_inodes(pid)
    return [item for item in overlapping if item.inode not in owned]


def describe(found: list[Listener]) -> str:
    """``address:port`` of each listener, for an error message."""
    return ", ".join(sorted({f"{item.address}:{item.port}" for item in found}))
