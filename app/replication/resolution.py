"""Name resolution for the mesh: DNS discovery and, optionally, peer host names.

Discovery asks for the A and AAAA records of ``KURA_DISCOVERY_DNS_NAME`` through
dnspython: the system's resolver configuration (``/etc/resolv.conf``, search domains
included), or the server ``KURA_DISCOVERY_DNS_SERVER`` names (kura-py). When that server
is set, peer URLs that name hosts (``http://kura-0.kura-headless...:7443``) are
resolved through it as well, so a mesh whose names live in that server works without
touching the system's resolver.
"""
from __future__ import annotations

import ipaddress
import logging

import dns.exception
import dns.resolver

log = logging.getLogger("kura.membership")
LIFETIME_S = 2.0


class Resolver:
    def __init__(self, server: str = "") -> None:
        """``server``: ``host:port`` of the DNS server to ask; empty: the system's configuration."""
        self.server = server
        if server:
            host, _, port = server.rpartition(":")
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [host.strip("[]")]
            self._resolver.port = int(port)
        else:
            self._resolver = dns.resolver.Resolver()
        self._resolver.cache = None  # members come and go: ask every time

    def addresses(self, name: str) -> list[str]:
        """Every A and AAAA address of ``name`` (sorted); empty when it does not resolve."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = self._resolver.resolve(name, rdtype, search=True, lifetime=LIFETIME_S)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                continue
            except dns.exception.DNSException as exc:
                log.warning("event=dns_lookup_failed name=%s type=%s error=%s", name, rdtype,
                            type(exc).__name__)
                continue
            found.extend(str(ipaddress.ip_address(r.address)) for r in answer)
        return sorted(set(found))

    def address(self, host: str) -> str:
        """An address to connect to for ``host`` (returned as is when it is an address)."""
        try:
            ipaddress.ip_address(host.strip("[]"))
            return host
        except ValueError:
            pass
        addresses = self.addresses(host)
        if not addresses:
            raise OSError(f"cannot resolve peer host {host!r} through {self.server or 'the system resolver'}")
        return addresses[0]
