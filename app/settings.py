"""Node configuration: the only reader of ``os.environ``.

Every setting has an embedded default so that ``gunicorn -c gunicorn.conf.py``
with no environment starts a working single node. A bad value raises
``ConfigError`` naming the variable; the process refuses to start.
"""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class ConfigError(ValueError):
    """A ``KURA_*`` variable has a value the node cannot run with."""


def _parse_int(name: str, raw: str, minimum: int = 0) -> int:
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _parse_port(name: str, raw: str) -> int:
    value = _parse_int(name, raw, minimum=0)
    if value > 65535:
        raise ConfigError(f"{name} must be a TCP port (0-65535), got {value}")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _parse_urls(name: str, raw: str) -> tuple[str, ...]:
    urls = []
    for part in raw.replace(" ", ",").split(","):
        part = part.strip().rstrip("/")
        if not part:
            continue
        if not (part.startswith("http://") or part.startswith("https://")):
            raise ConfigError(f"{name} entries must be http(s) URLs, got {part!r}")
        urls.append(part)
    return tuple(dict.fromkeys(urls))


@dataclass(frozen=True)
class Settings:
    """Validated, immutable node configuration (SPEC section 9)."""

    port: int = 4000
    grpc_port: int = 50051
    internal_port: int = 7443
    bind_host: str = "0.0.0.0"
    tenant_id: str = "default"
    region: str = "local"
    data_dir: str = "./data"
    tmp_dir: str = ""  # default: <data_dir>/tmp
    # kura-py: where the memory-mapped files live (``app.run_dir``); the gunicorn master
    # always sets it (default /dev/shm/kura-<id>) for the processes it starts.
    run_dir: str = ""
    node_url: str = ""  # default: http://<hostname>:<internal_port>
    peers: tuple[str, ...] = ()
    discovery_dns_name: str = ""
    discovery_dns_server: str = ""  # kura-py: "host:port" of the DNS server for discovery
    peer_connect_timeout_ms: int = 5_000  # kura-py
    peer_idle_timeout_ms: int = 30_000  # kura-py: a peer transfer fails after this long without a byte
    peer_loss_timeout_ms: int = 15_000  # kura-py: an unanswering peer leaves the membership after this
    tmp_dir_max_bytes: int = 8 * GIB
    cas_capacity_bytes: int = 0  # 0: 50 % of the data filesystem (resolved at start)
    max_keyvalue_bytes: int = 1 * MIB
    outbox_max_depth: int = 100_000
    replication_bandwidth_limit_bytes_per_second: int = 512 * MIB
    replication_public_latency_target_ms: int = 100
    bootstrap_timeout_ms: int = 1_800_000
    bootstrap_max_concurrent_peers: int = 8
    multipart_upload_ttl_ms: int = 24 * 3600 * 1000
    drain_completion_timeout_ms: int = 240_000
    internal_tls_ca_cert_path: str = ""
    internal_tls_cert_path: str = ""
    internal_tls_key_path: str = ""
    # Public TLS (Kura's names): with both paths set, a second public listener on
    # KURA_HTTPS_PORT serves HTTP/1.1 and h2 over TLS, chosen by ALPN.
    public_tls_cert_path: str = ""
    public_tls_key_path: str = ""
    https_port: int = 4443
    extension_enabled: bool = False
    extension_script_path: str = ""
    extension_hook_timeout_ms: int = 25
    # Analytics webhooks (Kura's contract, for Tuist): both or neither of url and key.
    analytics_server_url: str = ""
    analytics_signing_key: str = field(default="", repr=False)
    analytics_queue_capacity: int = 1000
    analytics_batch_size: int = 100
    analytics_batch_timeout_ms: int = 5000
    analytics_request_timeout_ms: int = 5000
    analytics_circuit_breaker_failure_threshold: int = 5
    analytics_circuit_breaker_open_ms: int = 30_000
    # Traces (app.tracing): off unless the OTLP/HTTP endpoint is set. Kura requires the
    # other two; here they have defaults, so that a node with no environment at all starts.
    otlp_traces_endpoint: str = ""
    otel_service_name: str = "kura"
    otel_deployment_environment: str = "production"
    # Every KURA_* variable: the per-id extension settings (signers, JWT verifiers, HTTP
    # clients) are parsed from it, and hook scripts read it with kura.env (tuist.lua reads
    # KURA_CONTROL_PLANE_* names, for example).
    kura_env: Mapping[str, str] = field(default_factory=dict)
    http_workers: int = 0  # 0: one gevent worker per core
    grpc_workers: int = 0  # 0: one REAPI process per core
    worker_connections: int = 1000
    http_header_timeout_ms: int = 60_000  # a request head must arrive within this (nginx: 60 s)
    segment_max_bytes: int = 512 * MIB
    lmdb_map_size: int = 64 * GIB
    log_level: str = "info"

    @property
    def resolved_tmp_dir(self) -> str:
        return self.tmp_dir or os.path.join(self.data_dir, "tmp")

    @property
    def internal_tls(self) -> bool:
        """Mutual TLS on the internal plane (all three KURA_INTERNAL_TLS_* paths set)."""
        return bool(self.internal_tls_ca_cert_path and self.internal_tls_cert_path
                    and self.internal_tls_key_path)

    @property
    def public_tls(self) -> bool:
        """The HTTPS listener is on (both KURA_PUBLIC_TLS_* paths set)."""
        return bool(self.public_tls_cert_path and self.public_tls_key_path)

    @property
    def resolved_run_dir(self) -> str:
        """The node's per-run directory. A process the gunicorn master did not start (a test
        opening a store in-process) uses ``<data_dir>/run``."""
        return self.run_dir or os.path.join(self.data_dir, "run")

    @property
    def resolved_node_url(self) -> str:
        scheme = "https" if self.internal_tls else "http"
        return self.node_url or f"{scheme}://{socket.gethostname()}:{self.internal_port}"

    @property
    def resolved_http_workers(self) -> int:
        return self.http_workers or (os.cpu_count() or 1)

    @property
    def resolved_grpc_workers(self) -> int:
        """REAPI processes the master runs (they share the gRPC port, app.port_guard)."""
        return self.grpc_workers or (os.cpu_count() or 1)

    def with_overrides(self, **changes: Any) -> "Settings":
        return replace(self, **changes)

    def resolved_capacity_bytes(self) -> int:
        """Capacity from the setting, or 50 % of the data filesystem; never above 80 %."""
        os.makedirs(self.data_dir, exist_ok=True)
        total = shutil.disk_usage(self.data_dir).total
        ceiling = int(total * 0.8)
        if self.cas_capacity_bytes:
            return min(self.cas_capacity_bytes, ceiling)
        return total // 2

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        parsers: dict[str, tuple[str, Callable[[str, str], Any]]] = {
            "KURA_PORT": ("port", _parse_port),
            "KURA_GRPC_PORT": ("grpc_port", _parse_port),
            "KURA_INTERNAL_PORT": ("internal_port", _parse_port),
            "KURA_BIND_HOST": ("bind_host", _parse_str),
            "KURA_TENANT_ID": ("tenant_id", _parse_tenant),
            "KURA_REGION": ("region", _parse_str),
            "KURA_DATA_DIR": ("data_dir", _parse_path),
            "KURA_TMP_DIR": ("tmp_dir", _parse_path),
            "KURA_RUN_DIR": ("run_dir", _parse_path),
            "KURA_NODE_URL": ("node_url", _parse_node_url),
            "KURA_PEERS": ("peers", _parse_urls),
            "KURA_DISCOVERY_DNS_NAME": ("discovery_dns_name", _parse_str),
            "KURA_DISCOVERY_DNS_SERVER": ("discovery_dns_server", _parse_host_port),
            "KURA_PEER_CONNECT_TIMEOUT_MS": ("peer_connect_timeout_ms", _positive),
            "KURA_PEER_IDLE_TIMEOUT_MS": ("peer_idle_timeout_ms", _positive),
            "KURA_PEER_LOSS_TIMEOUT_MS": ("peer_loss_timeout_ms", _positive),
            "KURA_TMP_DIR_MAX_BYTES": ("tmp_dir_max_bytes", _positive),
            "KURA_CAS_CAPACITY_BYTES": ("cas_capacity_bytes", _parse_int),
            "KURA_MAX_KEYVALUE_BYTES": ("max_keyvalue_bytes", _positive),
            "KURA_OUTBOX_MAX_DEPTH": ("outbox_max_depth", _positive),
            "KURA_REPLICATION_BANDWIDTH_LIMIT_BYTES_PER_SECOND": (
                "replication_bandwidth_limit_bytes_per_second", _parse_int),
            "KURA_REPLICATION_PUBLIC_LATENCY_TARGET_MS": (
                "replication_public_latency_target_ms", _positive),
            "KURA_BOOTSTRAP_TIMEOUT_MS": ("bootstrap_timeout_ms", _positive),
            "KURA_BOOTSTRAP_MAX_CONCURRENT_PEERS": ("bootstrap_max_concurrent_peers", _positive),
            "KURA_MULTIPART_UPLOAD_TTL_MS": ("multipart_upload_ttl_ms", _positive),
            "KURA_DRAIN_COMPLETION_TIMEOUT_MS": ("drain_completion_timeout_ms", _parse_int),
            "KURA_INTERNAL_TLS_CA_CERT_PATH": ("internal_tls_ca_cert_path", _parse_str),
            "KURA_INTERNAL_TLS_CERT_PATH": ("internal_tls_cert_path", _parse_str),
            "KURA_INTERNAL_TLS_KEY_PATH": ("internal_tls_key_path", _parse_str),
            "KURA_PUBLIC_TLS_CERT_PATH": ("public_tls_cert_path", _parse_path),
            "KURA_PUBLIC_TLS_KEY_PATH": ("public_tls_key_path", _parse_path),
            "KURA_HTTPS_PORT": ("https_port", _parse_port),
            "KURA_EXTENSION_ENABLED": ("extension_enabled", _parse_bool),
            "KURA_EXTENSION_SCRIPT_PATH": ("extension_script_path", _parse_str),
            "KURA_EXTENSION_HOOK_TIMEOUT_MS": ("extension_hook_timeout_ms", _positive),
            "KURA_ANALYTICS_SERVER_URL": ("analytics_server_url", _parse_node_url),
            "KURA_ANALYTICS_SIGNING_KEY": ("analytics_signing_key", _parse_str),
            "KURA_ANALYTICS_QUEUE_CAPACITY": ("analytics_queue_capacity", _positive),
            "KURA_ANALYTICS_BATCH_SIZE": ("analytics_batch_size", _positive),
            "KURA_ANALYTICS_BATCH_TIMEOUT_MS": ("analytics_batch_timeout_ms", _positive),
            "KURA_ANALYTICS_REQUEST_TIMEOUT_MS": ("analytics_request_timeout_ms", _positive),
            "KURA_ANALYTICS_CIRCUIT_BREAKER_FAILURE_THRESHOLD": (
                "analytics_circuit_breaker_failure_threshold", _positive),
            "KURA_ANALYTICS_CIRCUIT_BREAKER_OPEN_MS": ("analytics_circuit_breaker_open_ms", _positive),
            "KURA_OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("otlp_traces_endpoint", _parse_otlp_endpoint),
            "KURA_OTEL_SERVICE_NAME": ("otel_service_name", _parse_str),
            "KURA_OTEL_DEPLOYMENT_ENVIRONMENT": ("otel_deployment_environment", _parse_str),
            "KURA_HTTP_WORKERS": ("http_workers", _parse_int),
            "KURA_GRPC_WORKERS": ("grpc_workers", _positive),
            "KURA_WORKER_CONNECTIONS": ("worker_connections", _positive),
            "KURA_HTTP_HEADER_TIMEOUT_MS": ("http_header_timeout_ms", _positive),
            "KURA_SEGMENT_MAX_BYTES": ("segment_max_bytes", _segment_size),
            "KURA_LMDB_MAP_SIZE": ("lmdb_map_size", _segment_size),
            "KURA_LOG_LEVEL": ("log_level", _parse_log_level),
        }
        values: dict[str, Any] = {}
        for var, (attr, parse) in parsers.items():
            raw = env.get(var)
            if raw is None or (raw.strip() == "" and attr not in ("tmp_dir", "node_url")):
                continue
            values[attr] = parse(var, raw)
        values["kura_env"] = {k: v for k, v in env.items() if k.startswith("KURA_")}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        tls = [self.internal_tls_ca_cert_path, self.internal_tls_cert_path, self.internal_tls_key_path]
        if any(tls) and not all(tls):
            raise ConfigError(
                "KURA_INTERNAL_TLS_CA_CERT_PATH, KURA_INTERNAL_TLS_CERT_PATH and "
                "KURA_INTERNAL_TLS_KEY_PATH must be set together")
        if self.internal_tls:
            if not self.resolved_node_url.startswith("https://"):
                raise ConfigError("KURA_NODE_URL must be an https:// URL when KURA_INTERNAL_TLS_* "
                                  f"is set, got {self.resolved_node_url!r}")
            plain = [p for p in self.peers if not p.startswith("https://")]
            if plain:
                raise ConfigError("KURA_PEERS entries must be https:// URLs when KURA_INTERNAL_TLS_* "
                                  f"is set, got {plain[0]!r}")
        if bool(self.analytics_server_url) != bool(self.analytics_signing_key):
            raise ConfigError("KURA_ANALYTICS_SERVER_URL and KURA_ANALYTICS_SIGNING_KEY must be set "
                              "together")
        if bool(self.public_tls_cert_path) != bool(self.public_tls_key_path):
            raise ConfigError("KURA_PUBLIC_TLS_CERT_PATH and KURA_PUBLIC_TLS_KEY_PATH must be set "
                              "together")
        ports = {"KURA_PORT": self.port, "KURA_GRPC_PORT": self.grpc_port,
                 "KURA_INTERNAL_PORT": self.internal_port}
        if self.public_tls:
            ports["KURA_HTTPS_PORT"] = self.https_port
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port and port in seen:
                raise ConfigError(f"{name} and {seen[port]} must differ, both are {port}")
            seen[port] = name
        if self.extension_script_path and not os.path.isfile(self.extension_script_path):
            raise ConfigError(
                f"KURA_EXTENSION_SCRIPT_PATH points to {self.extension_script_path!r}, "
                "which is not a readable file")

    @property
    def extension_env(self) -> dict[str, str]:
        """The ``KURA_EXTENSION_*`` subset of ``kura_env``."""
        return {k: v for k, v in self.kura_env.items() if k.startswith("KURA_EXTENSION_")}

    @property
    def extensions_active(self) -> bool:
        return self.extension_enabled or bool(self.extension_script_path)


def _parse_str(name: str, raw: str) -> str:
    return raw.strip()


def _parse_path(name: str, raw: str) -> str:
    value = raw.strip()
    if "\0" in value:
        raise ConfigError(f"{name} must be a path without NUL characters")
    return value


def _parse_tenant(name: str, raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > 256 or any(ord(c) < 32 for c in value):
        raise ConfigError(f"{name} must be a non-empty printable id of at most 256 characters")
    return value


def _parse_node_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    if value and not (value.startswith("http://") or value.startswith("https://")):
        raise ConfigError(f"{name} must be an http(s) URL, got {raw!r}")
    return value


def _parse_otlp_endpoint(name: str, raw: str) -> str:
    """The OTLP/HTTP traces URL, used as is (``http://otel-collector:4318/v1/traces``), as
    Kura's exporter uses it. Anything but an http(s) URL with a host is refused: spans are
    exported over HTTP only, so ``grpc://...`` or a bare ``host:port`` could never work."""
    value = raw.strip()
    parts = urlsplit(value)
    try:
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number in range
        usable = False
    if not usable:
        raise ConfigError(f"{name} must be an http(s) OTLP/HTTP traces URL such as "
                          f"http://otel-collector:4318/v1/traces, got {raw!r}")
    return value


def _parse_host_port(name: str, raw: str) -> str:
    value = raw.strip()
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{name} must be host:port, got {raw!r}")
    return value


def _positive(name: str, raw: str) -> int:
    return _parse_int(name, raw, minimum=1)


def _segment_size(name: str, raw: str) -> int:
    return _parse_int(name, raw, minimum=64 * KIB)


def _parse_log_level(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"{name} must be one of debug, info, warning, error, critical")
    return value
