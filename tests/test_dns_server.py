"""DnsServer answers a real dnspython resolver over UDP and TCP, and runtime changes are seen at once."""
from __future__ import annotations

import socket
from collections.abc import Callable

import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from tests.dns_server import DnsServer

NAME = "kura-headless.test."


def _resolver(server: DnsServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    resolver.lifetime = 5
    return resolver


def _addresses(resolver: dns.resolver.Resolver, name: str, rdtype: str, tcp: bool = False) -> set[str]:
    return {rdata.address for rdata in resolver.resolve(name, rdtype, tcp=tcp)}


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_resolves_a_and_aaaa_sets_exactly(tcp: bool, dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server({NAME: ["127.0.0.2", "127.0.0.3", "::1"], "other.test.": ["127.0.0.9"]})
    resolver = _resolver(server)

    assert _addresses(resolver, NAME, "A", tcp) == {"127.0.0.2", "127.0.0.3"}
    assert _addresses(resolver, NAME, "AAAA", tcp) == {"::1"}
    answer = resolver.resolve(NAME, "A", tcp=tcp)
    assert answer.rrset is not None and answer.rrset.ttl == 0


def test_names_match_case_insensitively_and_without_the_trailing_dot(
        dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server({"Kura-Headless.test": ["127.0.0.2"]})
    assert _addresses(_resolver(server), "kura-headless.TEST", "A") == {"127.0.0.2"}


def test_unknown_name_is_nxdomain(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server({NAME: ["127.0.0.2"]})
    with pytest.raises(dns.resolver.NXDOMAIN):
        _resolver(server).resolve("missing.test.", "A")


def test_known_name_without_that_type_has_no_answer(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server({NAME: ["127.0.0.2"]})
    reply = dns.query.udp(dns.message.make_query(NAME, "AAAA"), "127.0.0.1", port=server.port, timeout=5)
    assert (reply.rcode(), reply.answer) == (dns.rcode.NOERROR, [])
    with pytest.raises(dns.resolver.NoAnswer):
        _resolver(server).resolve(NAME, "AAAA")


def test_runtime_changes_are_seen_by_the_next_query(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server({NAME: ["127.0.0.2", "127.0.0.3"]})
    resolver = _resolver(server)
    assert _addresses(resolver, NAME, "A") == {"127.0.0.2", "127.0.0.3"}

    server.set_records({NAME: ["127.0.0.2", "127.0.0.3", "127.0.0.4"]})
    assert _addresses(resolver, NAME, "A") == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}

    server.set_records({NAME: ["127.0.0.4"]})
    assert _addresses(resolver, NAME, "A") == {"127.0.0.4"}

    server.set_records({})
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(NAME, "A")
    assert server.queries == 4


def test_bad_address_is_refused_when_records_are_set(dns_server: Callable[..., DnsServer]) -> None:
    server = dns_server({NAME: ["127.0.0.2"]})
    with pytest.raises(ValueError):
        server.set_records({NAME: ["not-an-ip"]})
    assert _addresses(_resolver(server), NAME, "A") == {"127.0.0.2"}


def test_close_stops_answering() -> None:
    server = DnsServer({NAME: ["127.0.0.2"]})
    port = server.port
    server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


@pytest.mark.parametrize("address", ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
def test_loopback_aliases_accept_connections_on_one_shared_port(address: str) -> None:
    """Discovery tests bind one node per 127.0.0.x, all on the same port; Linux routes 127/8 to lo."""
    with socket.create_server(("127.0.0.2", 0)) as first:
        port = first.getsockname()[1]
        listener = first if address == "127.0.0.2" else socket.create_server((address, port))
        try:
            with socket.create_connection((address, port), timeout=2) as client:
                accepted, _ = listener.accept()
                with accepted:
                    client.sendall(b"hello")
                    assert accepted.recv(5) == b"hello"
                    assert accepted.getsockname() == (address, port)
        finally:
            if listener is not first:
                listener.close()
