"""What every WebSocket transport offers the driver, and the settings they share.

A transport knows nothing of the protocol. Every library's way of failing
is mapped to one of two outcomes: :class:`SandboxConnectionError` from
``connect`` (:class:`HandshakeRefused` with the HTTP status when the upgrade
was refused), and :class:`TransportClosed` from ``send``/``recv`` with a close
code (1006 for a loss).
"""

from __future__ import annotations

import ssl as ssl_module
from typing import Protocol

import certifi

from sandbox_proto import SandboxConnectionError

#: Both directions, every transport: the server accepts frames up to 16 MiB (1.1).
MAX_MESSAGE_SIZE = 16 * 2**20
#: Keepalive like uvicorn and upstream's client: a ping every 20 s, 20 s to answer.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
CLOSE_TIMEOUT = 5.0
USER_AGENT = "cloud-run-sandbox-python"


class TransportClosed(Exception):
    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed with code {code}")
        self.code = code
        self.reason = reason


class HandshakeRefused(SandboxConnectionError):
    """The server answered the WebSocket upgrade with an HTTP error."""

    def __init__(self, safe_url: str, http_status: int) -> None:
        hint = ""
        if http_status in (401, 403):
            hint = " (behind Cloud Run IAM: check the Authorization header and the roles/run.invoker role)"
        super().__init__(f"{safe_url}: server refused the WebSocket with HTTP {http_status}{hint}")
        self.http_status = http_status


class Transport(Protocol):
    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        """Open the WebSocket; return the handshake response's Set-Cookie values."""
        ...

    async def send(self, text: str) -> None: ...

    async def recv(self) -> str | bytes: ...

    async def close(self, code: int = 1000) -> None: ...

    async def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""
        ...


def default_ssl_context(url: str, ssl: ssl_module.SSLContext | None) -> ssl_module.SSLContext | None:
    """The TLS context for ``url``: certifi's CA bundle unless the caller gave one.

    A context given for a plain ``ws://`` URL is ignored rather than refused, so
    the upstream examples (which always pass one) also run against a local server.
    """
    if not url.startswith("wss://"):
        return None
    return ssl or ssl_module.create_default_context(cafile=certifi.where())
