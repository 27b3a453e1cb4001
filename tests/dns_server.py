"""A tiny real DNS server on loopback for discovery tests (UDP and TCP, A and AAAA records).

``DnsServer(records={"kura-headless.test.": ["127.0.0.2", "127.0.0.3", "::1"]})`` answers A and AAAA
queries for those names from a background thread on ``127.0.0.1:server.port`` (the same port for UDP
and TCP): the IPv4 addresses of a name as A, the IPv6 ones as AAAA, an empty NOERROR answer for a known
name without records of the asked type, and NXDOMAIN for any other name. ``set_records`` replaces the
whole table while the server runs, so a test can add or remove nodes; answers carry ``ttl`` (0 by
default) so a resolver does not keep stale addresses.

Point a resolver at it with::

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
"""
from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Records = Mapping[str, Iterable[str]]


def _table(records: Records) -> dict[dns.name.Name, dict[dns.rdatatype.RdataType, list[str]]]:
    """Index addresses by absolute name and record type; a bad address fails here, in the test."""
    table: dict[dns.name.Name, dict[dns.rdatatype.RdataType, list[str]]] = {}
    for name, addresses in records.items():
        by_type: dict[dns.rdatatype.RdataType, list[str]] = {dns.rdatatype.A: [], dns.rdatatype.AAAA: []}
        for address in addresses:
            ip = ipaddress.ip_address(address)
            by_type[dns.rdatatype.A if ip.version == 4 else dns.rdatatype.AAAA].append(str(ip))
        table[dns.name.from_text(name)] = by_type
    return table


class DnsServer:
    """An authoritative-only DNS server for a fixed, replaceable table of A/AAAA records."""

    def __init__(self, records: Records | None = None, host: str = "127.0.0.1", port: int = 0,
                 ttl: int = 0) -> None:
        self.host = host
        self.ttl = ttl
        self.queries = 0
        self._lock = threading.Lock()
        self._table = _table(records or {})
        self._udp, self._tcp = self._bind(host, port)
        self.port: int = self._udp.server_address[1]
        self._threads = [
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"DnsServer:{kind}:{self.port}", daemon=True)
            for kind, server in (("udp", self._udp), ("tcp", self._tcp))
        ]
        for thread in self._threads:
            thread.start()

    def set_records(self, records: Records) -> None:
        """Replace every record; queries answered after this returns see only the new table."""
        table = _table(records)
        with self._lock:
            self._table = table

    def answer(self, wire: bytes) -> bytes | None:
        """The wire response to one wire query, or None for bytes that are not a DNS query."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        with self._lock:
            self.queries += 1
            table = self._table
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        by_type = table.get(question.name)
        if by_type is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdclass == dns.rdataclass.IN and by_type.get(question.rdtype):
            response.answer.append(dns.rrset.from_text_list(
                question.name, self.ttl, dns.rdataclass.IN, question.rdtype, by_type[question.rdtype]))
        return response.to_wire()

    def close(self) -> None:
        """Stop both listeners and wait for their threads."""
        for server in (self._udp, self._tcp):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _bind(self, host: str, port: int) -> tuple[socketserver.UDPServer, socketserver.TCPServer]:
        owner = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = owner.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.connection.settimeout(5)
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    data = self.rfile.read(int.from_bytes(head, "big"))
                    reply = owner.answer(data)
                    if reply is None:
                        return
                    self.wfile.write(len(reply).to_bytes(2, "big") + reply)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        udp_class = type("UdpServer", (socketserver.ThreadingUDPServer,),
                         {"address_family": family, "daemon_threads": True})
        tcp_class = type("TcpServer", (socketserver.ThreadingTCPServer,),
                         {"address_family": family, "daemon_threads": True, "allow_reuse_address": True})
        # UDP takes a free port first; TCP then takes the same number, which another process may hold.
        for _ in range(20):
            udp = udp_class((host, port), Udp)
            try:
                tcp = tcp_class((host, udp.server_address[1]), Tcp)
            except OSError:
                udp.server_close()
                if port:
                    raise
                continue
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {host}")
