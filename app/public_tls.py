"""TLS on the public plane (Kura's ``KURA_PUBLIC_TLS_CERT_PATH`` / ``_KEY_PATH``).

With both paths set, the node binds a second public listener on ``KURA_HTTPS_PORT``
(default 4443, like Kura) that serves the same routes over TLS; ALPN chooses HTTP/2
(``h2``) or HTTP/1.1 per connection. The plain ``KURA_PORT`` listener keeps serving
HTTP/1.1 and cleartext HTTP/2 (h2c). The HTTP worker terminates TLS itself, per
connection, because gunicorn's ``certfile`` would put TLS on every listener.
"""
from __future__ import annotations

import ssl

from app.settings import ConfigError, Settings

# Preference order: HTTP/2 first, as Kura's listener offers it.
ALPN_PROTOCOLS = ("h2", "http/1.1")


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The public listener's TLS context, or None without ``KURA_PUBLIC_TLS_*``. Raises
    ``ConfigError`` naming the variables when the files cannot be used."""
    if not settings.public_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9113 9.2: h2 needs TLS 1.2 or later
    try:
        context.load_cert_chain(settings.public_tls_cert_path, settings.public_tls_key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "KURA_PUBLIC_TLS_CERT_PATH and KURA_PUBLIC_TLS_KEY_PATH must name a readable PEM "
            f"certificate and its private key ({settings.public_tls_cert_path!r}, "
            f"{settings.public_tls_key_path!r}): {exc}") from None
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    return context
