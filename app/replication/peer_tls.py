"""Mutual TLS on the internal plane (SPEC 6.7): the node's certificate, key and CA.

With ``KURA_INTERNAL_TLS_CA_CERT_PATH``, ``_CERT_PATH`` and ``_KEY_PATH`` the internal
listener requires a client certificate signed by that CA, and the peer client presents
the node's certificate and trusts only that CA (never the system's roots). The files
are re-read when they change (cert-manager rotates them in place) without a restart:
new connections use the new material, established ones finish with the old. A
rotation that leaves the files unreadable or inconsistent (a key that does not match
the certificate, half-written files) keeps the previous material and logs why, so a
rotation in progress never takes the node off the mesh.

A peer's identity in logs is the first 8 bytes of the sha256 of its leaf certificate
(DER), in hex.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import threading
from dataclasses import dataclass

from app.settings import ConfigError, Settings

log = logging.getLogger("kura.peer_tls")
REFRESH_S = 2.0
_FIRST_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def identity(der: bytes | None) -> str:
    """A certificate's short identity: first 8 bytes of sha256(DER), hex."""
    return hashlib.sha256(der).digest()[:8].hex() if der else "-"


@dataclass(frozen=True)
class _Material:
    stamp: tuple[tuple[int, int, int], ...]
    server: ssl.SSLContext
    client: ssl.SSLContext
    identity: str


class PeerTls:
    def __init__(self, ca_path: str, cert_path: str, key_path: str) -> None:
        self.paths = (ca_path, cert_path, key_path)
        self._lock = threading.Lock()
        self._material = self._load()
        self.generation = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> "PeerTls | None":
        """The node's TLS material, or None without ``KURA_INTERNAL_TLS_*``. Raises
        ``ConfigError`` naming the variables when the files cannot be used."""
        if not settings.internal_tls:
            return None
        try:
            return cls(settings.internal_tls_ca_cert_path, settings.internal_tls_cert_path,
                       settings.internal_tls_key_path)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                "KURA_INTERNAL_TLS_CA_CERT_PATH, KURA_INTERNAL_TLS_CERT_PATH and "
                f"KURA_INTERNAL_TLS_KEY_PATH do not make a usable TLS identity: {exc}") from None

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self.paths:
            st = os.stat(path)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def _load(self) -> _Material:
        ca, cert, key = self.paths
        stamp = self._stamp()
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.load_cert_chain(cert, key)
        server.load_verify_locations(cafile=ca)
        server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        client.load_cert_chain(cert, key)
        client.load_verify_locations(cafile=ca)
        with open(cert, encoding="ascii", errors="replace") as fh:
            leaf = _FIRST_PEM.search(fh.read())
        if leaf is None:
            raise ValueError(f"{cert} holds no PEM certificate")
        return _Material(stamp, server, client, identity(ssl.PEM_cert_to_DER_cert(leaf.group(0))))

    def refresh(self) -> bool:
        """Re-read the files if they changed; True when new material is in use."""
        try:
            stamp = self._stamp()
        except OSError as exc:
            log.error("event=peer_tls_reload_failed error=%r (keeping the current certificate)", str(exc))
            return False
        if stamp == self._material.stamp:
            return False
        try:
            material = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("event=peer_tls_reload_failed error=%r (keeping the current certificate)", str(exc))
            return False
        with self._lock:
            self._material = material
            self.generation += 1
        log.info("event=peer_tls_reloaded identity=%s generation=%d", material.identity, self.generation)
        return True

    @property
    def identity(self) -> str:
        return self._material.identity

    def server_context(self) -> ssl.SSLContext:
        return self._material.server

    def client_context(self) -> ssl.SSLContext:
        return self._material.client

    def start_watching(self) -> None:
        """Check the files every ``REFRESH_S`` (a greenlet in the replicator)."""
        import gevent

        def watch() -> None:
            while True:
                gevent.sleep(REFRESH_S)
                self.refresh()

        self._watcher = gevent.spawn(watch)

    def stop_watching(self) -> None:
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.kill()
