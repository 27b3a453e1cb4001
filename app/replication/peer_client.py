"""The one HTTP client kura-py uses to talk to its peers' internal API.

Every call has a connect timeout and an IDLE read timeout (no byte for
``KURA_PEER_IDLE_TIMEOUT_MS``, default 30 s) and never a total timeout, so a slow but
progressing transfer completes and a stalled one fails. Connections are kept alive
per peer. Runs in the replicator process (gevent-patched, so calls yield).
Failures of any kind (refused, reset, timeout, non-2xx) raise ``PeerError``; every
call is counted in ``kura_replication_requests_total{operation,result}``. A request made
within a trace span carries its W3C ``traceparent`` (``app.tracing``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from app import metrics, tracing
from app.replication.frames import FRAMES_CONTENT_TYPE
from app.replication.peer_tls import PeerTls

STATUS_TIMEOUT_S = 2.0
SYNC_BYTES_PER_S = 10 * 1024 * 1024


def target_label(peer: str) -> str:
    """A peer URL as Kura labels it in metrics: ``host:port``."""
    return urlsplit(peer).netloc or peer


class PeerError(Exception):
    def __init__(self, peer: str, operation: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{operation} on {peer} failed: {message}")
        self.peer = peer
        self.operation = operation
        self.status = status


class _PeerAdapter(HTTPAdapter):
    """Connections to peers: the node's TLS context (mTLS), an optional pinned TLS server
    name (a peer reached by address, verified under its DNS name), and optional host name
    resolution (``resolve``: connect to that address while the request keeps naming the host
    in its Host header and TLS server name)."""

    def __init__(self, resolve: Callable[[str], str] | None, pool_kw: dict[str, Any],
                 **kwargs: Any) -> None:
        self._resolve = resolve
        self._pool_kw = pool_kw
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs, **self._pool_kw)
        resolve = self._resolve
        if resolve is None:
            return

        def connection_class(base: type) -> type:
            class Resolving(base):  # type: ignore[misc, valid-type]
                def _new_conn(self) -> Any:
                    name = self._dns_host
                    self._dns_host = resolve(name)  # the connect step only reads it
                    try:
                        return super()._new_conn()
                    finally:
                        self._dns_host = name
            return Resolving

        def pool_class(base: type) -> type:
            return type(f"Resolving{base.__name__}", (base,),
                        {"ConnectionCls": connection_class(base.ConnectionCls)})

        self.poolmanager.pool_classes_by_scheme = {
            "http": pool_class(urllib3.HTTPConnectionPool),
            "https": pool_class(urllib3.HTTPSConnectionPool),
        }


class PeerClient:
    def __init__(self, *, connect_timeout_s: float, idle_timeout_s: float, pool_size: int = 32,
                 resolve: Callable[[str], str] | None = None, tls: PeerTls | None = None) -> None:
        """``resolve``: host name → address for peer connections (default: the system's);
        ``tls``: the node's certificate and CA for https peers (mTLS)."""
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._pool_size = pool_size
        self._resolve = resolve
        self._tls = tls
        self._tls_generation = tls.generation if tls else 0
        self._sessions: dict[str | None, requests.Session] = {}

    def _session(self, server_name: str | None = None) -> requests.Session:
        """The keep-alive session for peers (``server_name``: peers reached by address and
        verified under that name). A rotated certificate starts fresh connections."""
        if self._tls is not None and self._tls.generation != self._tls_generation:
            self._tls_generation = self._tls.generation
            for old in self._sessions.values():
                old.close()
            self._sessions.clear()
        session = self._sessions.get(server_name)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # never route peer traffic through an environment proxy
            pool_kw: dict[str, Any] = {}
            if self._tls is not None:
                pool_kw["ssl_context"] = self._tls.client_context()
            if server_name:
                pool_kw.update(server_hostname=server_name, assert_hostname=server_name)
            adapter = _PeerAdapter(self._resolve, pool_kw, pool_connections=16,
                                   pool_maxsize=self._pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._sessions[server_name] = session
        return session

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    @contextlib.contextmanager
    def _call(self, peer: str, operation: str, *, counted: bool = False) -> Iterator[None]:
        """Map transport failures to ``PeerError``; ``counted`` calls (outbox deliveries)
        go into ``kura_replication_requests_total`` as in Kura."""
        started = time.perf_counter()
        result = "error"
        try:
            yield
            result = "ok"
        except PeerError:
            raise
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise PeerError(peer, operation, f"{type(exc).__name__}: {exc}") from None
        finally:
            if counted:
                metrics.REPLICATION_REQUESTS.labels(target_label(peer), operation, result).inc()
                metrics.REPLICATION_DURATION.labels(operation).observe(time.perf_counter() - started)

    def _request(self, method: str, peer: str, operation: str, path: str, *,
                 timeout: float | tuple[float, float] | None = None, server_name: str | None = None,
                 **kwargs: Any) -> requests.Response:
        if tracing.TRACER is not None:
            kwargs["headers"] = tracing.inject(kwargs.get("headers"))
        response = self._session(server_name).request(
            method, peer + path, timeout=timeout or (self.connect_timeout_s, self.idle_timeout_s),
            **kwargs)
        if not 200 <= response.status_code < 300:
            detail = response.text[:200] if not kwargs.get("stream") else ""
            response.close()
            raise PeerError(peer, operation, f"HTTP {response.status_code} {detail}".strip(),
                            response.status_code)
        return response

    # -- membership --------------------------------------------------------------
    def status(self, peer: str, server_name: str | None = None) -> dict[str, Any]:
        """A peer's ``/_internal/status``; ``server_name``: the name to verify its TLS
        certificate under when ``peer`` is an address (DNS discovery over https)."""
        with self._call(peer, "status"):
            response = self._request("GET", peer, "status", "/_internal/status",
                                     timeout=(min(self.connect_timeout_s, STATUS_TIMEOUT_S),
                                              STATUS_TIMEOUT_S), server_name=server_name)
            doc = response.json()
            if not isinstance(doc, dict):
                raise ValueError("status is not a JSON object")
            return doc

    # -- replication -------------------------------------------------------------
    def send_batch(self, peer: str, frames: Iterable[bytes], size: int) -> dict[str, Any]:
        """Deliver a framed batch of artifact versions (``size`` bytes, streamed).

        After the last byte the peer makes the batch durable before it answers, which for
        a large batch is a legitimate silence: the wait for the answer is the idle timeout
        plus the time to sync ``size`` bytes at a pessimistic ``SYNC_BYTES_PER_S``."""
        wait = self.idle_timeout_s + size / SYNC_BYTES_PER_S
        with self._call(peer, "upsert_artifact", counted=True):
            response = self._request("POST", peer, "upsert_artifact", "/_internal/replicate/batch",
                                     data=iter(frames), timeout=(self.connect_timeout_s, wait),
                                     headers={"Content-Type": FRAMES_CONTENT_TYPE})
            return response.json() if response.content else {}

    def delete_namespace(self, peer: str, namespace_id: str, version_ms: int) -> None:
        with self._call(peer, "delete_namespace", counted=True):
            self._request("DELETE", peer, "delete_namespace",
                          f"/_internal/replicate/namespace?namespace_id={quote(namespace_id, safe='')}"
                          f"&version_ms={version_ms}").close()

    # -- bootstrap -----------------------------------------------------------------
    def _page(self, peer: str, operation: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        with self._call(peer, operation):
            doc = self._request("GET", peer, operation, path, params=params).json()
            if not isinstance(doc, dict):
                raise ValueError(f"{operation} page is not a JSON object")
            return doc

    def tombstones(self, peer: str, after: str | None, limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._page(peer, "bootstrap_tombstones", "/_internal/bootstrap/namespace_tombstones",
                          params)

    def digest(self, peer: str, prefix_len: int) -> dict[str, Any]:
        return self._page(peer, "bootstrap_digest", "/_internal/bootstrap/digest",
                          {"prefix_len": prefix_len})

    def manifests(self, peer: str, after: str | None, limit: int, prefix: str) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "prefix": prefix}
        if after:
            params["after"] = after
        return self._page(peer, "bootstrap_manifests", "/_internal/bootstrap/manifests", params)

    def fetch_bodies(self, peer: str, artifact_ids: list[str],
                     consume: Callable[[Callable[[int], bytes]], Any]) -> Any:
        """Stream the framed bodies of ``artifact_ids`` into ``consume(read)``; returns what
        it returns. A read that sees no byte for the idle timeout raises."""
        with self._call(peer, "bootstrap_bodies"):
            response = self._request("POST", peer, "bootstrap_bodies", "/_internal/bootstrap/bodies",
                                     json={"artifact_ids": artifact_ids}, stream=True)
            try:
                return consume(lambda n: response.raw.read(n))
            finally:
                response.close()
