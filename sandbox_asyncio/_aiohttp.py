"""The aiohttp transport: for applications that already hold an ``aiohttp.ClientSession``.

Cookies go through the session's cookie jar, which aiohttp fills from the
handshake's ``Set-Cookie`` and replays on every later request, so this
transport leaves the ``Cookie`` header to it. A session we create ourselves
uses an ``unsafe`` jar so that cookies of IP-address hosts (the local
server) are kept too; a caller's session is used as it is and never closed.
"""

from __future__ import annotations

import ssl as ssl_module

import aiohttp

from _sandbox_anyio import (
    CLOSE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    HandshakeRefused,
    TransportClosed,
    default_ssl_context,
)
from sandbox_proto import SandboxConnectionError, redact


class AiohttpTransport:
    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        self._session = session
        self._owns_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        safe = redact(url)
        context = default_ssl_context(url, ssl)
        try:
            self._ws = await self._session.ws_connect(
                url,
                headers={k: v for k, v in headers.items() if k.lower() != "cookie"},
                ssl=context if context is not None else True,
                # aiohttp pings only when asked. heartbeat=N pings every N s like the other
                # transports, but allows only N/2 for the pong: a dead peer is noticed sooner.
                heartbeat=PING_INTERVAL,
                max_msg_size=MAX_MESSAGE_SIZE,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                autoclose=True,
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise HandshakeRefused(safe, exc.status) from None
        except TimeoutError:
            raise SandboxConnectionError(f"{safe}: no WebSocket handshake within {timeout:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SandboxConnectionError(f"{safe}: cannot connect: {redact(str(exc))}") from None
        return []

    async def send(self, text: str) -> None:
        assert self._ws is not None
        if self._ws.closed:
            raise TransportClosed(self._ws.close_code or 1006)
        try:
            await self._ws.send_str(text)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransportClosed(1006, str(exc)) from None

    async def recv(self) -> str | bytes:
        assert self._ws is not None
        msg = await self._ws.receive()
        if msg.type is aiohttp.WSMsgType.TEXT:
            return str(msg.data)
        if msg.type is aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type is aiohttp.WSMsgType.CLOSE:
            raise TransportClosed(int(msg.data), str(msg.extra or ""))
        # CLOSED or ERROR: a loss unless a close code was recorded.
        raise TransportClosed(self._ws.close_code or 1006)

    async def close(self, code: int = 1000) -> None:
        try:
            if self._ws is not None:
                await self._ws.close(code=code)
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()
                self._session = None
