"""The default asyncio transport, on ``websockets``' asyncio API."""

from __future__ import annotations

import logging
import ssl as ssl_module

import websockets
from websockets.asyncio.client import ClientConnection, connect

from _sandbox_anyio import (
    CLOSE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    PING_TIMEOUT,
    USER_AGENT,
    HandshakeRefused,
    TransportClosed,
    default_ssl_context,
)
from sandbox_proto import RedactingFilter, SandboxConnectionError, redact

#: Handed to websockets, whose debug log shows request lines and frames with the token.
library_logger = logging.getLogger("sandbox_asyncio.websockets")
library_logger.addFilter(RedactingFilter())


class WebsocketsTransport:
    def __init__(self) -> None:
        self._ws: ClientConnection | None = None

    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        safe = redact(url)
        context = default_ssl_context(url, ssl)
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
                user_agent_header=USER_AGENT,
                logger=library_logger,
                ssl=context,
            )
        except websockets.InvalidStatus as exc:
            raise HandshakeRefused(safe, exc.response.status_code) from None
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

    async def abort(self) -> None:
        if self._ws is not None:
            self._ws.transport.abort()


def _close_info(exc: websockets.ConnectionClosed) -> tuple[int, str]:
    if exc.rcvd is not None:
        return exc.rcvd.code, exc.rcvd.reason
    if exc.sent is not None and exc.sent.code != 1000:
        return exc.sent.code, exc.sent.reason  # e.g. our keepalive timeout (1011)
    return 1006, ""
