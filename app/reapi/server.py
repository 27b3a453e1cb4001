"""Composition root of the REAPI process: ``python -m app.reapi`` runs :func:`main`.

One ``ArtifactStore`` (opened in this process, never inherited across a fork)
is handed to every servicer through one ``ReapiCache``. The gRPC server is a
plain thread pool: no gevent in this process. SIGTERM / SIGINT stop accepting
new RPCs, let in-flight ones finish (bounded by KURA_DRAIN_COMPLETION_TIMEOUT_MS,
capped at ``MAX_DRAIN_GRACE_S``), close the store and exit 0.

The master runs ``KURA_GRPC_WORKERS`` of these processes. With more than one it
passes ``--share-port``: each binds the gRPC port with SO_REUSEPORT (the kernel
spreads connections over them) behind ``app.port_guard``, which refuses a port that
a process outside the node listens on too. Each process marks itself serving in its
node-state slot once it listens; ``/ready`` waits for all of them.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from app import port_guard
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


def server_options(share_port: bool = False) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        # Alone, a second process on the same port must fail to bind, not share it
        # silently; the node's own REAPI processes share it behind app.port_guard.
        ("grpc.so_reuseport", int(share_port)),
        # Bazel keeps channels open for a whole build; answer its keepalive pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def build_server(settings: Settings, store: ArtifactStore, node_state: NodeState, *,
                 host: str | None = None, port: int | None = None,
                 max_workers: int = MAX_WORKERS, share_port: bool = False) -> ReapiServer:
    """Build, bind and start the gRPC server over ``store`` (port 0: pick a free one).
    ``share_port``: bind with SO_REUSEPORT (the caller guards the port)."""
    executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reapi")
    # The observer comes first: it counts and maps the denials the hooks raise.
    interceptors: list[grpc.ServerInterceptor] = [RpcObserver(node_state)]
    extensions = Extensions.from_settings(settings)
    if extensions is not None:
        interceptors.append(ExtensionsInterceptor(extensions, settings.tenant_id))
    server = grpc.server(executor, interceptors=interceptors, options=server_options(share_port))
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


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.reapi")
    parser.add_argument("--share-port", action="store_true",
                        help="share the gRPC port with the other REAPI processes of the node "
                             "(children of the same master), SO_REUSEPORT behind app.port_guard")
    return parser.parse_args(argv)


def _check_port(settings: Settings) -> None:
    """Raise OSError when a process outside this node listens on the gRPC port too."""
    foreign = port_guard.foreign_listeners(settings.bind_host, settings.grpc_port, os.getppid())
    if foreign:
        raise OSError("the gRPC port is also listened on by a process outside this node "
                      f"({port_guard.describe(foreign)})")


def _start(settings: Settings, store: ArtifactStore, node_state: NodeState,
           share_port: bool) -> ReapiServer:
    """Bind and start the server; a shared port is checked before binding and again after
    (a process outside the node that bound in between is seen then)."""
    if share_port:
        _check_port(settings)
    running = build_server(settings, store, node_state, share_port=share_port)
    if share_port:
        try:
            _check_port(settings)
        except OSError:
            running.server.stop(None)
            raise
    return running


def main(argv: list[str] | None = None) -> int:
    """Run the REAPI process until SIGTERM / SIGINT; returns the exit status."""
    from app import stop_signals

    args = _parse_args(argv)
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
        running = _start(settings, store, node_state, args.share_port)
    except OSError as exc:
        log.error("event=reapi_bind_failed port=%d message=%r", settings.grpc_port, str(exc))
        store.close()
        tracing.shutdown()
        return 1
    node_state.set_serving(True)

    log.info("event=reapi_listening port=%d host=%s pid=%d threads=%d shared_port=%s data_dir=%s",
             running.port, settings.bind_host, os.getpid(), MAX_WORKERS,
             str(args.share_port).lower(), settings.data_dir)

    while not stop.wait(POLL_S):
        running.follow_drain(node_state.draining)

    grace_s = min(settings.drain_completion_timeout_ms / 1000.0, MAX_DRAIN_GRACE_S)
    log.info("event=reapi_draining signal=%s grace_s=%.1f inflight=%d",
             stop.signal_name, grace_s, node_state.inflight(KIND_REAPI))
    node_state.set_serving(False)
    running.stop(grace_s)
    node_state.release_pid(os.getpid())
    tracing.shutdown()  # exports the spans still queued (bounded)
    log.info("event=reapi_stopped")
    return 0
