"""The internal peer API on ``KURA_INTERNAL_PORT`` (SPEC section 6.2), served by the replicator.

Kura's routes, for peers and operators that speak them:

- ``GET /_internal/status``: ``{region, tenant_id, node_url}`` plus ``known_peers``
  (peer node URL → when this node admitted it, ms) so a joining peer knows when this
  node's writers started replicating to it (kura-py).
- ``PUT /_internal/replicate/artifact?producer&inline&namespace_id&key&content_type&version_ms[&origin]``:
  one artifact version, raw body; 204 whether applied or ignored as stale.
- ``DELETE /_internal/replicate/namespace?namespace_id&version_ms``: 204.
- ``GET /_internal/bootstrap/namespace_tombstones?after&limit``,
  ``GET /_internal/bootstrap/manifests?after&limit&prefix`` (pages ordered by artifact id
  with a ``next_after`` cursor), ``GET /_internal/bootstrap/digest?prefix_len=3``,
  ``GET /_internal/bootstrap/artifacts/{artifact_id}`` (the body; 404 when gone).

And two batch routes between kura-py peers (``app.replication.frames``):
``POST /_internal/replicate/batch`` (framed artifact versions) and
``POST /_internal/bootstrap/bodies`` (``{"artifact_ids": [...]}`` → framed bodies).

Every replicated write is fdatasync'ed and committed before the 2xx, creates no outbox
rows, and is applied only if it wins last-writer-wins. This API is never served on
the public port, and the Lua hooks never run here.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import ssl
import time
from typing import Any, Callable

from flask import Flask, Response, jsonify, request

from app import metrics, tracing
from app.errors import BadRequest, NotFound, TruncatedBody
from app.http.errors import register_error_handlers
from app.replication.frames import FRAMES_CONTENT_TYPE, BodyStream
from app.replication.pacing import UNPACED, Pacer
from app.replication.peer_tls import PeerTls, identity
from app.replication.receive import (SOURCE_REPLICATION, artifact_from_fields, count_outcomes,
                                     receive_frames)
from app.settings import Settings
from app.storage.catalog import MAX_PAGE, MAX_PREFIX_LEN
from app.storage.keys import parse_decimal
from app.storage.segments import Offload, direct_call
from app.storage.store import APPLIED, ArtifactStore

log = logging.getLogger("kura.internal")
CHUNK = 1024 * 1024  # request body reads
MAX_BODIES_PER_REQUEST = 1024
MAX_BODIES_REQUEST_BYTES = 1024 * 1024
DEFAULT_PAGE = 256


def _int_arg(name: str, default: int | None = None, minimum: int = 0, maximum: int = 1 << 62) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        if default is None:
            raise BadRequest(f"Missing {name}")
        return default
    return parse_decimal(raw, name, minimum=minimum, maximum=maximum)


def _read_input(n: int) -> bytes:
    try:
        return request.environ["wsgi.input"].read(n)
    except (OSError, ValueError) as exc:  # reset socket, bad chunked framing, idle timeout
        raise TruncatedBody(f"Incomplete body: {type(exc).__name__}") from exc


def create_internal_app(settings: Settings, store: ArtifactStore,
                        known_peers: Callable[[], dict[str, int]] = dict,
                        offload: Offload = direct_call, pacer: Pacer = UNPACED) -> Flask:
    """The internal API over ``store``; ``known_peers`` reports the admitted peers;
    ``offload`` runs the long scans (bucket digests) off the event loop; ``pacer`` paces
    every body byte received or served."""
    read_body = pacer.reader(_read_input)
    app = Flask("kura-internal", static_folder=None)
    app.url_map.merge_slashes = False
    tracing.instrument(app, untraced=("status",))  # membership probes every 2 s: no spans

    @app.get("/_internal/status")
    def status() -> Response:
        return jsonify({"region": settings.region, "tenant_id": settings.tenant_id,
                        "node_url": settings.resolved_node_url, "known_peers": known_peers()})

    @app.put("/_internal/replicate/artifact")
    def replicate_artifact() -> Response:
        fields: dict[str, Any] = request.args.to_dict(flat=True)
        declared = request.content_length
        fields["size"] = declared if declared is not None else 0
        item = artifact_from_fields(fields)
        [outcome] = store.replicated_outcomes([item])
        if outcome != APPLIED:
            # As Kura: a stale version is acknowledged without reading its body.
            metrics.REPLICATION_APPLY_RESULTS.labels(SOURCE_REPLICATION, "artifact", outcome).inc()
            return Response(status=204, headers={"Connection": "close"})
        with store.stage(hashing=False) as staged:
            while True:
                data = read_body(CHUNK)
                if not data:
                    break
                staged.write(data)
            staged.finish(expected_size=declared)
            fields["size"] = staged.size
            item = artifact_from_fields(fields, (staged.fd, 0))
            results = store.apply_replicated([item], staged=staged)
        count_outcomes(SOURCE_REPLICATION, results)
        return Response(status=204)

    @app.post("/_internal/replicate/batch")
    def replicate_batch() -> Response:
        with store.stage(hashing=False) as staged:
            received = receive_frames(store, read_body, SOURCE_REPLICATION, staged)
        return jsonify({"artifacts": received.artifacts, "applied": received.applied})

    @app.delete("/_internal/replicate/namespace")
    def replicate_namespace() -> Response:
        namespace = request.args.get("namespace_id", "")
        version = _int_arg("version_ms", minimum=1)
        artifact_from_fields({"producer": "gradle", "namespace_id": namespace, "key": "k",
                              "version_ms": version, "size": 0})  # same validation as artifacts
        outcome = store.apply_replicated_namespace_delete(namespace, version)
        metrics.REPLICATION_APPLY_RESULTS.labels(SOURCE_REPLICATION, "namespace_delete", outcome).inc()
        log.info("event=namespace_delete_replicated namespace=%r version_ms=%d outcome=%s",
                 namespace, version, outcome)
        return Response(status=204)

    @app.get("/_internal/bootstrap/namespace_tombstones")
    def bootstrap_tombstones() -> Response:
        rows, next_after = store.catalog.tombstones_page(
            request.args.get("after"), _int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE))
        return jsonify({"tombstones": rows, "next_after": next_after})

    @app.get("/_internal/bootstrap/manifests")
    def bootstrap_manifests() -> Response:
        entries, next_after = store.catalog.manifests_page(
            request.args.get("after"), _int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE),
            request.args.get("prefix", ""))
        return jsonify({"manifests": [e.to_json() for e in entries], "next_after": next_after})

    @app.get("/_internal/bootstrap/digest")
    def bootstrap_digest() -> Response:
        prefix_len = _int_arg("prefix_len", 3, 1, MAX_PREFIX_LEN)
        started = time.perf_counter()
        buckets = offload(store.catalog.bucket_digests, prefix_len)
        log.debug("event=bootstrap_digest buckets=%d seconds=%.3f", len(buckets),
                  time.perf_counter() - started)
        return jsonify({"prefix_len": prefix_len,
                        "buckets": [{"prefix": p, **d} for p, d in sorted(buckets.items())]})

    @app.get("/_internal/bootstrap/artifacts/<artifact_id>")
    def bootstrap_artifact(artifact_id: str) -> Response:
        found = store.lookup_id(_artifact_id(artifact_id))
        if found is None:
            raise NotFound("Artifact not found")
        manifest = found.manifest
        headers = {"Content-Length": str(found.size), "X-Kura-Version-Ms": str(manifest.version_ms),
                   "X-Kura-Origin": manifest.origin}
        stream = BodyStream(store, [(artifact_id, found)], pace=pacer.acquire)
        return Response(stream.frames(with_headers=False), headers=headers,
                        content_type=manifest.content_type, direct_passthrough=True)

    @app.post("/_internal/bootstrap/bodies")
    def bootstrap_bodies() -> Response:
        raw = request.stream.read(MAX_BODIES_REQUEST_BYTES + 1)
        if len(raw) > MAX_BODIES_REQUEST_BYTES:
            raise BadRequest("Too many artifact ids")
        try:
            ids = json.loads(raw)["artifact_ids"]
        except (ValueError, KeyError, TypeError):
            raise BadRequest("Expected {\"artifact_ids\": [...]}") from None
        if not isinstance(ids, list) or len(ids) > MAX_BODIES_PER_REQUEST:
            raise BadRequest(f"artifact_ids must be a list of at most {MAX_BODIES_PER_REQUEST} ids")
        stream = BodyStream(store, [(hex_id, store.lookup_id(_artifact_id(hex_id))) for hex_id in ids],
                            pace=pacer.acquire)
        return Response(stream.frames(), direct_passthrough=True,
                        headers={"Content-Length": str(stream.length)},
                        content_type=FRAMES_CONTENT_TYPE)

    @app.after_request
    def count_request(response: Response) -> Response:
        rule = request.url_rule
        metrics.record_http(_RULE_VARIABLE.sub(r"{\1}", rule.rule) if rule is not None
                            else metrics.UNMATCHED_ROUTE, response.status_code)
        return response

    register_error_handlers(app)
    return app


# A Flask rule's ``<name>`` is Kura's ``{name}`` in the ``route`` label.
_RULE_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _artifact_id(hex_id: Any) -> bytes:
    if not isinstance(hex_id, str) or len(hex_id) != 64:
        raise BadRequest("Invalid artifact id: expected 64 hex characters")
    try:
        return bytes.fromhex(hex_id)
    except ValueError:
        raise BadRequest("Invalid artifact id: expected 64 hex characters") from None


def internal_bind_host(settings: Settings) -> str:
    """Where the internal listener binds. A node with no peer, no discovery name and no
    mTLS has nobody to talk to on this port, which accepts artifact writes: it binds
    loopback only (its own ``KURA_BIND_HOST`` when that is a loopback address)."""
    if settings.internal_tls or settings.peers or settings.discovery_dns_name:
        return settings.bind_host
    try:
        if ipaddress.ip_address(settings.bind_host).is_loopback:
            return settings.bind_host
    except ValueError:
        pass
    return "127.0.0.1"


def serve_internal_api(settings: Settings, app: Flask, tls: PeerTls | None = None) -> Any:
    """Start serving ``app`` on ``KURA_INTERNAL_PORT`` (gevent's WSGI server, replicator only).

    A peer that sends nothing for ``KURA_PEER_IDLE_TIMEOUT_MS`` is cut off (the TLS
    handshake included); there is no total timeout, so a slow transfer completes. With
    ``tls`` every connection must present a client certificate signed by the CA; the
    context is taken per connection, so a rotated certificate applies to new ones."""
    from gevent.pywsgi import WSGIHandler, WSGIServer

    idle_timeout_s = settings.peer_idle_timeout_ms / 1000
    seen: set[str] = set()

    class Handler(WSGIHandler):
        def handle(self) -> None:
            self.socket.settimeout(idle_timeout_s)
            super().handle()

    class InternalServer(WSGIServer):
        def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
            assert tls is not None
            client_socket.settimeout(idle_timeout_s)
            try:
                tls_socket = tls.server_context().wrap_socket(client_socket, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("event=peer_tls_refused remote=%s reason=%r", address[0],
                            getattr(exc, "reason", None) or str(exc))
                client_socket.close()
                return None
            with contextlib.closing(tls_socket):
                peer = identity(tls_socket.getpeercert(binary_form=True))
                if peer not in seen and len(seen) < 4096:
                    seen.add(peer)
                    log.info("event=peer_tls_connection identity=%s remote=%s", peer, address[0])
                return self.handle(tls_socket, address)

    host = internal_bind_host(settings)
    ssl_args = {"ssl_context": tls.server_context()} if tls is not None else {}
    server = InternalServer((host, settings.internal_port), app, log=None, handler_class=Handler,
                            **ssl_args)
    server.start()
    if tls is None and (settings.peers or settings.discovery_dns_name):
        log.warning("event=internal_port_unauthenticated port=%d: without KURA_INTERNAL_TLS_* anyone "
                    "who can reach this port can write artifacts into this node; keep it on a "
                    "network only the nodes reach (the Helm chart's NetworkPolicy does)",
                    settings.internal_port)
    log.info("event=internal_api_listening host=%s port=%d tls=%s identity=%s", host,
             settings.internal_port, str(tls is not None).lower(), tls.identity if tls else "-")
    return server
