"""Extension configuration parsed from ``Settings.extension_env``.

``app.settings`` is the only reader of ``os.environ``; it hands every
``KURA_EXTENSION_*`` variable to this module, which validates the per-id
host resources (signers, JWT verifiers, HTTP clients) and the runtime knobs.
A bad value raises ``ConfigError`` naming the variable; a per-id variable with
a suffix this version does not know (``KURA_EXTENSION_SIGNER_EDGE_FOO``) is
logged as a warning naming it and otherwise ignored.

Names follow Kura (tuist/tuist ``kura/src/extension/mod.rs``); the ones marked
"kura-py" below do not exist in Kura.
"""
from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from typing import Mapping

from app.settings import ConfigError, Settings

log = logging.getLogger("kura.extensions")

PREFIX = "KURA_EXTENSION_"
SIGNER_PREFIX = "KURA_EXTENSION_SIGNER_"
JWT_VERIFIER_PREFIX = "KURA_EXTENSION_JWT_VERIFIER_"
HTTP_CLIENT_PREFIX = "KURA_EXTENSION_HTTP_CLIENT_"

# Headers that identify the caller. Decision caches are keyed on these only,
# so noise headers (user-agent, traceparent, x-request-id, ...) never fragment
# them. KURA_EXTENSION_CREDENTIAL_HEADERS adds more names.
DEFAULT_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")

JWT_ALGORITHMS = ("HS256", "HS384", "HS512")
DEFAULT_MEMORY_LIMIT_BYTES = 64 * 1024 * 1024
# Every pool slot is guaranteed memory_limit / (2 × pool size) of headroom (memory.py).
MIN_GUARANTEED_BYTES = 512 * 1024
SIGNER_ALGORITHMS = {"hmac-sha256": "sha256", "hmac_sha256": "sha256", "hmacsha256": "sha256"}


@dataclass(frozen=True)
class SignerConfig:
    """``KURA_EXTENSION_SIGNER_<ID>_{ALGORITHM,SECRET}``; the secret is base64 of the raw key."""

    id: str
    digest: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class JwtVerifierConfig:
    """``KURA_EXTENSION_JWT_VERIFIER_<ID>_{ALGORITHM,SECRET,ISSUER,AUDIENCES}``."""

    id: str
    algorithm: str
    secret: str = field(repr=False)
    issuer: str | None
    audiences: tuple[str, ...]


@dataclass(frozen=True)
class HttpClientConfig:
    """``KURA_EXTENSION_HTTP_CLIENT_<ID>_{BASE_URL,CONNECT_TIMEOUT_MS,REQUEST_TIMEOUT_MS,HEADERS_<NAME>}``."""

    id: str
    base_url: str
    connect_timeout_s: float
    request_timeout_s: float
    default_headers: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ExtensionConfig:
    """Everything the extension runtime needs, validated once at start."""

    script_path: str
    tenant_id: str
    hook_timeout_s: float = 0.025
    allow_ttl_s: float = 600.0
    deny_ttl_s: float = 3.0
    fail_closed_authenticate: bool = True
    fail_closed_authorize: bool = True
    fail_open_response_headers: bool = True
    cache_max_entries: int = 100_000
    runtime_pool_size: int = 32
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES  # all Lua states of one process together
    max_abandoned_hooks: int = 2
    hook_io_budget_s: float = 5.0
    credential_headers: tuple[str, ...] = DEFAULT_CREDENTIAL_HEADERS
    signers: Mapping[str, SignerConfig] = field(default_factory=dict)
    jwt_verifiers: Mapping[str, JwtVerifierConfig] = field(default_factory=dict)
    http_clients: Mapping[str, HttpClientConfig] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ExtensionConfig":
        env = dict(settings.extension_env)
        if not settings.extension_script_path:
            raise ConfigError("KURA_EXTENSION_SCRIPT_PATH must be set when KURA_EXTENSION_ENABLED is true")
        pool_size = _int(env, "KURA_EXTENSION_RUNTIME_POOL_SIZE", 32, minimum=1)
        extra_credentials = tuple(
            h.strip().lower() for h in env.get("KURA_EXTENSION_CREDENTIAL_HEADERS", "").split(",") if h.strip())
        return cls(
            script_path=settings.extension_script_path,
            tenant_id=settings.tenant_id,
            hook_timeout_s=settings.extension_hook_timeout_ms / 1000.0,
            allow_ttl_s=float(_int(env, "KURA_EXTENSION_AUTH_CACHE_ALLOW_TTL_SECONDS", 600)),
            deny_ttl_s=float(_int(env, "KURA_EXTENSION_AUTH_CACHE_DENY_TTL_SECONDS", 3)),
            fail_closed_authenticate=_bool(env, "KURA_EXTENSION_FAIL_CLOSED_AUTHENTICATE", True),
            fail_closed_authorize=_bool(env, "KURA_EXTENSION_FAIL_CLOSED_AUTHORIZE", True),
            fail_open_response_headers=_bool(env, "KURA_EXTENSION_FAIL_OPEN_RESPONSE_HEADERS", True),
            cache_max_entries=_int(env, "KURA_EXTENSION_CACHE_MAX_ENTRIES", 100_000, minimum=1),
            runtime_pool_size=pool_size,
            memory_limit_bytes=_memory_limit(env, pool_size),
            max_abandoned_hooks=_int(env, "KURA_EXTENSION_MAX_ABANDONED_HOOKS", 2, minimum=1),
            hook_io_budget_s=_int(env, "KURA_EXTENSION_HOOK_IO_BUDGET_MS", 5000, minimum=1) / 1000.0,
            credential_headers=tuple(dict.fromkeys(DEFAULT_CREDENTIAL_HEADERS + extra_credentials)),
            signers=_parse_signers(env),
            jwt_verifiers=_parse_jwt_verifiers(env),
            http_clients=_parse_http_clients(env),
            env=dict(settings.kura_env),
        )


def normalize_id(raw: str) -> str:
    """Resource ids are case-insensitive: ``kura.jwt_verify("tuist", ...)`` uses ``..._TUIST_...``."""
    return raw.strip().upper()


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _memory_limit(env: Mapping[str, str], pool_size: int) -> int:
    minimum = 2 * pool_size * MIN_GUARANTEED_BYTES
    value = _int(env, "KURA_EXTENSION_MEMORY_LIMIT_BYTES", max(DEFAULT_MEMORY_LIMIT_BYTES, minimum))
    if value < minimum:
        raise ConfigError(f"KURA_EXTENSION_MEMORY_LIMIT_BYTES must be >= {minimum} (1 MiB per Lua state of "
                          f"KURA_EXTENSION_RUNTIME_POOL_SIZE={pool_size}), got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _group(env: Mapping[str, str], prefix: str, suffixes: tuple[str, ...],
           open_suffix: str | None = None) -> dict[str, dict[str, tuple[str, str]]]:
    """Group ``<prefix><ID>_<SUFFIX>`` variables by id: {id: {suffix: (var, value)}}.

    ``open_suffix`` (e.g. ``HEADERS``) accepts ``<ID>_HEADERS_<NAME>``; those are
    stored under ``"HEADERS:<NAME>"``. The longest suffix wins, so ids may contain
    underscores (``TUIST_LICENSE``).
    """
    grouped: dict[str, dict[str, tuple[str, str]]] = {}
    for var, value in env.items():
        if not var.startswith(prefix):
            continue
        rest = var[len(prefix):]
        matched = False
        if open_suffix and f"_{open_suffix}_" in rest:
            ident, _, name = rest.partition(f"_{open_suffix}_")
            if ident and name:
                grouped.setdefault(normalize_id(ident), {})[f"{open_suffix}:{name}"] = (var, value)
                matched = True
        if not matched:
            for suffix in sorted(suffixes, key=len, reverse=True):
                if rest.endswith(f"_{suffix}") and len(rest) > len(suffix) + 1:
                    grouped.setdefault(normalize_id(rest[: -len(suffix) - 1]), {})[suffix] = (var, value)
                    matched = True
                    break
        if not matched:
            # A suffix this version does not know (a typo, or a setting of a newer version) does
            # not stop the node, but is said out loud. A known name with a bad value stays fatal.
            expected = ", ".join(f"{prefix}<ID>_{s}" for s in suffixes)
            log.warning("event=extension_unknown_variable variable=%s expected=%r", var, expected)
    return grouped


def _parse_signers(env: Mapping[str, str]) -> dict[str, SignerConfig]:
    signers: dict[str, SignerConfig] = {}
    for ident, values in _group(env, SIGNER_PREFIX, ("ALGORITHM", "SECRET")).items():
        algo_var, algorithm = values.get("ALGORITHM", (f"{SIGNER_PREFIX}{ident}_ALGORITHM", "hmac-sha256"))
        digest = SIGNER_ALGORITHMS.get(algorithm.strip().lower())
        if digest is None:
            raise ConfigError(f"{algo_var} must be hmac-sha256, got {algorithm!r}")
        if "SECRET" not in values:
            raise ConfigError(f"{SIGNER_PREFIX}{ident}_SECRET must be set for signer {ident.lower()!r}")
        secret_var, secret = values["SECRET"]
        try:
            key = base64.b64decode(secret.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{secret_var} must be the base64 encoding of the raw HMAC key") from None
        if not key:
            raise ConfigError(f"{secret_var} must not be empty")
        signers[ident] = SignerConfig(id=ident, digest=digest, key=key)
    return signers


def _parse_jwt_verifiers(env: Mapping[str, str]) -> dict[str, JwtVerifierConfig]:
    verifiers: dict[str, JwtVerifierConfig] = {}
    grouped = _group(env, JWT_VERIFIER_PREFIX, ("ALGORITHM", "SECRET", "ISSUER", "AUDIENCES"))
    for ident, values in grouped.items():
        algo_var, algorithm = values.get("ALGORITHM", (f"{JWT_VERIFIER_PREFIX}{ident}_ALGORITHM", "HS256"))
        algorithm = algorithm.strip().upper()
        if algorithm not in JWT_ALGORITHMS:
            raise ConfigError(f"{algo_var} must be one of {', '.join(JWT_ALGORITHMS)}, got {algorithm!r}")
        if "SECRET" not in values or not values["SECRET"][1]:
            raise ConfigError(f"{JWT_VERIFIER_PREFIX}{ident}_SECRET must be set for verifier {ident.lower()!r}")
        issuer = values.get("ISSUER", ("", ""))[1].strip() or None
        audiences = tuple(a.strip() for a in values.get("AUDIENCES", ("", ""))[1].split(",") if a.strip())
        verifiers[ident] = JwtVerifierConfig(
            id=ident, algorithm=algorithm, secret=values["SECRET"][1], issuer=issuer, audiences=audiences)
    return verifiers


def _parse_http_clients(env: Mapping[str, str]) -> dict[str, HttpClientConfig]:
    clients: dict[str, HttpClientConfig] = {}
    grouped = _group(env, HTTP_CLIENT_PREFIX, ("BASE_URL", "CONNECT_TIMEOUT_MS", "REQUEST_TIMEOUT_MS"),
                     open_suffix="HEADERS")
    for ident, values in grouped.items():
        if "BASE_URL" not in values:
            raise ConfigError(f"{HTTP_CLIENT_PREFIX}{ident}_BASE_URL must be set for HTTP client {ident.lower()!r}")
        url_var, base_url = values["BASE_URL"]
        base_url = base_url.strip().rstrip("/")
        if not (base_url.startswith("http://") or base_url.startswith("https://")):
            raise ConfigError(f"{url_var} must be an http(s) URL, got {base_url!r}")
        connect_ms = _int(dict([values["CONNECT_TIMEOUT_MS"]]), values["CONNECT_TIMEOUT_MS"][0], 500,
                          minimum=1) if "CONNECT_TIMEOUT_MS" in values else 500
        request_ms = _int(dict([values["REQUEST_TIMEOUT_MS"]]), values["REQUEST_TIMEOUT_MS"][0], 1500,
                          minimum=1) if "REQUEST_TIMEOUT_MS" in values else 1500
        headers = {k.split(":", 1)[1].lower().replace("_", "-"): v
                   for k, (_, v) in values.items() if k.startswith("HEADERS:")}
        clients[ident] = HttpClientConfig(
            id=ident, base_url=base_url, connect_timeout_s=connect_ms / 1000.0,
            request_timeout_s=request_ms / 1000.0, default_headers=headers)
    return clients
