"""WebSocket transports for the asyncio adapter: move text frames, report closes.

A transport knows nothing of the protocol. Every library's way of failing
is mapped to one of two outcomes: :class:`SandboxConnectionError` from
``connect`` (with the HTTP status when the handshake was refused), and
:class:`TransportClosed` from ``recv`` with a close code (1006 for a loss).
"""

from __future__ import annotations

import logging
import ssl as ssl_module
from typing import Protocol

import certifi
import websockets
from websockets.asyncio.client import ClientConnection, connect

from sandbox_proto import RedactingFilter, SandboxConnectionError, redact

#: Handed to the WebSocket library, whose debug log shows the request line with the token.
library_logger = logging.getLogger("sandbox_asyncio.websockets")
library_logger.addFilter(RedactingFilter())

#: Both directions, every transport: the server accepts frames up to 16 MiB (1.1).
MAX_MESSAGE_SIZE = 16 * 2**20
#: Keepalive like uvicorn and upstream's client: a ping every 20 s, 20 s to answer.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
CLOSE_TIMEOUT = 5.0


class TransportClosed(Exception):
    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed with code {code}")
        self.code = code
        self.reason = reason


class HandshakeRefused(SandboxConnectionError):
    """The server answered the WebSocket upgrade with an HTTP error."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
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


def default_ssl_context(url: str, ssl: ssl_module.SSLContext | None) -> ssl_module.SSLContext | None:
    """``wss://`` without an explicit context verifies against certifi's CA bundle."""
    if ssl is None and url.startswith("wss://"):
        return ssl_module.create_default_context(cafile=certifi.where())
    return ssl


def http_hint(status: int) -> str:
    if status in (401, 403):
        return " (for Cloud Run IAM: check the Authorization header and the roles/run.invoker role)"
    return ""


class WebsocketsTransport:
    """The default transport, on ``websockets``' asyncio API."""

    def __init__(self) -> None:
        self._ws: ClientConnection | None = None

    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        safe = redact(url)
        kwargs: dict[str, object] = {}
        context = default_ssl_context(url, ssl)
        if context is not None:
            kwargs["ssl"] = context
        try:
            self._ws = await connect(
                url,
                additional_headers=headers,
                open_timeout=timeout,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                max_size=MAX_MESSAGE_SIZE,
                max_queue=16,
                user_agent_header="cloud-run-sandbox-python",
                logger=library_logger,
                **kwargs,  # type: ignore[arg-type]
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            raise HandshakeRefused(
                f"{safe}: server refused the WebSocket with HTTP {status}{http_hint(status)}", status
            ) from None
        except TimeoutError:
            raise SandboxConnectionError(f"{safe}: no WebSocket handshake within {timeout:g}s") from None
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI, ssl_module.SSLError) as exc:
            raise SandboxConnectionError(f"{safe}: cannot connect: {redact(str(exc))}") from None
        assert self._ws.response is not None
        return self._ws.response.headers.get_all("Set-Cookie")

    async def send(self, text: str) -> None:
        assert self._ws is not None
        try:
            await self._ws.send(text)
        except websockets.ConnectionClosed as exc:
            raise TransportClosed(*_close_info(exc)) from None

    async def recv(self) -> str | bytes:
        assert self._ws is not None
        try:
            return await self._ws.recv()
        except websockets.ConnectionClosed as exc:
            raise TransportClosed(*_close_info(exc)) from None

    async def close(self, code: int = 1000) -> None:
        if self._ws is not None:
            await self._ws.close(code)


def _close_info(exc: websockets.ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    if exc.sent is not None and exc.sent.code != 1000:
        return exc.sent.code, exc.sent.reason  # e.g. our keepalive timeout (1011)
    return 1006, ""
