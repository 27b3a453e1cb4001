"""Composition root of the REAPI process: ``python -m app.reapi`` runs :func:`main`.

One ``ArtifactStore`` (opened in this process, never inherited across a fork)
is handed to every servicer through one ``ReapiCache``. The gRPC server is a
plain thread pool: no gevent in this process. SIGTERM / SIGINT stop accepting
new RPCs, let in-flight ones finish (bounded by KURA_DRAIN_COMPLETION_TIMEOUT_MS,
capped at ``MAX_DRAIN_GRACE_S``), close the store and exit 0.
"""
from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from app.node_state import KIND_REAPI, NodeState, state_path
from app.reapi.action_cache import ActionCacheService
from app.reapi.bytestream import ByteStreamService
from app.reapi.cache import ReapiCache
from app.reapi.capabilities import (MAX_RECEIVE_MESSAGE_BYTES, MAX_SEND_MESSAGE_BYTES,
                                    CapabilitiesService)
from app.reapi.cas import CasService
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from app.reapi.gen.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from app.reapi.gen.google.bytestream import bytestream_pb2 as bs_pb2
from app.reapi.gen.google.bytestream import bytestream_pb2_grpc as bs_grpc
from app import tracing
from app.extensions import Extensions
from app.extensions.grpc_interceptor import ExtensionsInterceptor
from app.reapi.observer import RpcObserver
from app.settings import ConfigError, Settings
from app.storage.store import ArtifactStore

log = logging.getLogger("kura.reapi")

# One Bazel action uploads ~40 blobs at once and a build runs many actions: each
# stream holds a worker thread for its duration, so at least 256 concurrent streams
# must get a thread (calls beyond the pool queue; they are never rejected, since
# maximum_concurrent_rpcs is left unset).
MAX_WORKERS = 320
MAX_DRAIN_GRACE_S = 120.0
POLL_S = 1.0

CACHE_SERVICES = (
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    bs_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
)


@dataclass
class ReapiServer:
    """A started gRPC server and what it owns."""

    server: grpc.Server
    port: int
    store: ArtifactStore
    health: health.HealthServicer
    draining: bool = False

    def follow_drain(self, draining: bool) -> None:
        """Report NOT_SERVING while the node drains (new calls get UNAVAILABLE meanwhile)."""
        if draining == self.draining:
            return
        self.draining = draining
        log.info("event=reapi_health serving=%s", str(not draining).lower())
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if draining
                  else health_pb2.HealthCheckResponse.SERVING)
        for name in ("", *CACHE_SERVICES):
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        """Refuse new RPCs, wait up to ``grace_s`` for in-flight ones, then close the store."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.store.close()


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        # A second process on the same port must fail to bind, not share it silently.
        ("grpc.so_reuseport", 0),
        # Bazel keeps channels open for a whole build; answer its keepalive pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def build_server(settings: Settings, store: ArtifactStore, node_state: NodeState, *,
                 host: str | None = None, port: int | None = None,
                 max_workers: int = MAX_WORKERS) -> ReapiServer:
    """Build, bind and start the gRPC server over ``store`` (port 0: pick a free one)."""
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reapi")
    # The observer comes first: it counts and maps the denials the hooks raise.
    interceptors: list[grpc.ServerInterceptor] = [RpcObserver(node_state)]
    extensions = Extensions.from_settings(settings)
    if extensions is not None:
        interceptors.append(ExtensionsInterceptor(extensions, settings.tenant_id))
    server = grpc.server(executor, interceptors=interceptors, options=server_options())
    cache = ReapiCache(store)
    re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(), server)
    re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(cache), server)
    re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(cache), server)
    bs_grpc.add_ByteStreamServicer_to_server(ByteStreamService(cache), server)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *CACHE_SERVICES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*CACHE_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    host = settings.bind_host if host is None else host
    port = settings.grpc_port if port is None else port
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
    if not bound:
        raise OSError(f"cannot listen for gRPC on {address}")
    server.start()
    return ReapiServer(server, bound, store, health_servicer)


def main(argv: list[str] | None = None) -> int:
    """Run the REAPI process until SIGTERM / SIGINT; returns the exit status."""
    from app import stop_signals

    stop = stop_signals.listen()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        log.error("event=reapi_config_error message=%r", str(exc))
        return 1
    logging.getLogger().setLevel(settings.log_level.upper())
    tracing.start(settings, "reapi")

    node_state = NodeState(state_path(settings.resolved_run_dir))
    node_state.claim_slot(KIND_REAPI)
    store = ArtifactStore(settings, node_state=node_state)
    try:
        running = build_server(settings, store, node_state)
    except OSError as exc:
        log.error("event=reapi_bind_failed port=%d message=%r", settings.grpc_port, str(exc))
        store.close()
        tracing.shutdown()
        return 1

    log.info("event=reapi_listening port=%d host=%s pid=%d workers=%d data_dir=%s",
             running.port, settings.bind_host, os.getpid(), MAX_WORKERS, settings.data_dir)

    while not stop.wait(POLL_S):
        running.follow_drain(node_state.draining)

    grace_s = min(settings.drain_completion_timeout_ms / 1000.0, MAX_DRAIN_GRACE_S)
    log.info("event=reapi_draining signal=%s grace_s=%.1f inflight=%d",
             stop.signal_name, grace_s, node_state.inflight(KIND_REAPI))
    running.stop(grace_s)
    node_state.release_pid(os.getpid())
    tracing.shutdown()  # exports the spans still queued (bounded)
    log.info("event=reapi_stopped")
    return 0
