"""The trio transport, on ``trio-websocket``.

trio-websocket sends no keepalive pings, so this transport runs its own
(same interval and answer time as the other transports) in the sandbox's
nursery, where the library's connection tasks also run.
"""

from __future__ import annotations

import logging
import ssl as ssl_module

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from _sandbox_anyio import (
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    PING_TIMEOUT,
    USER_AGENT,
    HandshakeRefused,
    TransportClosed,
    default_ssl_context,
)
from sandbox_proto import RedactingFilter, SandboxConnectionError, redact

# trio-websocket logs every URL it connects to, token included.
logging.getLogger("trio-websocket").addFilter(RedactingFilter())


class TrioWebsocketTransport:
    def __init__(self) -> None:
        #: Set by the sandbox before connecting: where the connection's tasks run.
        self.nursery: trio.Nursery | None = None
        self._ws: WebSocketConnection | None = None
        # Ends the keepalive task with its connection, so it never holds the nursery open.
        self._keepalive_scope = trio.CancelScope()

    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        assert self.nursery is not None
        safe = redact(url)
        extra = [(k.encode(), v.encode()) for k, v in {"User-Agent": USER_AGENT, **headers}.items()]
        try:
            with trio.fail_after(timeout):
                self._ws = await connect_websocket_url(
                    self.nursery,
                    url,
                    default_ssl_context(url, ssl),
                    extra_headers=extra,
                    max_message_size=MAX_MESSAGE_SIZE,
                    message_queue_size=16,
                )
        except ConnectionRejected as exc:
            raise HandshakeRefused(safe, exc.status_code) from None
        except trio.TooSlowError:
            raise SandboxConnectionError(f"{safe}: no WebSocket handshake within {timeout:g}s") from None
        except (HandshakeError, OSError, ssl_module.SSLError) as exc:
            cause = exc.__cause__ or exc
            raise SandboxConnectionError(f"{safe}: cannot connect: {redact(str(cause))}") from None
        self._keepalive_scope.cancel()
        self._keepalive_scope = trio.CancelScope()
        self.nursery.start_soon(self._keepalive, self._ws, self._keepalive_scope)
        return [value.decode("latin-1") for name, value in self._ws.handshake_headers if name == b"set-cookie"]

    async def _keepalive(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        with scope:
            while ws.closed is None:
                await trio.sleep(PING_INTERVAL)
                try:
                    with trio.fail_after(PING_TIMEOUT):
                        await ws.ping()
                except trio.TooSlowError:
                    await ws.aclose(1011, "keepalive ping timeout")
                    return
                except ConnectionClosed:
                    return

    async def send(self, text: str) -> None:
        assert self._ws is not None
        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def recv(self) -> str | bytes:
        assert self._ws is not None
        try:
            return await self._ws.get_message()
        except ConnectionClosed as exc:
            self._keepalive_scope.cancel()
            raise _closed(exc) from None

    async def close(self, code: int = 1000) -> None:
        self._keepalive_scope.cancel()
        if self._ws is not None:
            await self._ws.aclose(code)


def _closed(exc: ConnectionClosed) -> TransportClosed:
    if exc.reason is None:
        return TransportClosed(1006)
    return TransportClosed(exc.reason.code, exc.reason.reason or "")
