"""The aiohttp transport: for applications that already hold an ``aiohttp.ClientSession``.

With the caller's session, cookies go through that session's cookie jar, which
aiohttp fills from the handshake's ``Set-Cookie`` and replays on every later
request, so this transport leaves the ``Cookie`` header to it; the session is
used as it is and never closed.

Without one, every sandbox of an event loop shares one session of ours (a
session, its connector and its jar cost ~5 KiB per sandbox otherwise). That
session keeps no cookies: like the other transports, the core's ``Cookie``
header is sent and the handshake's ``Set-Cookie`` values are handed back to
the core, so sandboxes never see each other's affinity cookies. It is closed
when the last sandbox using it closes its connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl as ssl_module
import weakref
from types import SimpleNamespace

import aiohttp

from _sandbox_anyio import (
    CLOSE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    HandshakeRefused,
    PullTransport,
    TransportClosed,
    default_ssl_context,
)
from sandbox_proto import SandboxConnectionError, redact

#: Set-Cookie values of the handshake in progress in this task (filled by the trace hook).
_handshake_cookies: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "sandbox_aiohttp_handshake_cookies", default=None
)


async def _on_request_end(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
) -> None:
    cookies = _handshake_cookies.get()
    if cookies is not None:
        cookies[:] = params.response.headers.getall("Set-Cookie", [])


class _SharedSession:
    """One event loop's session, and how many transports hold it."""

    def __init__(self) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(_on_request_end)
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(),
            # No pool limit: every open WebSocket holds a connection of the pool.
            connector=aiohttp.TCPConnector(limit=0),
            trace_configs=[trace],
        )
        self.users = 0


_shared_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SharedSession] = weakref.WeakKeyDictionary()


def _acquire_shared() -> _SharedSession:
    loop = asyncio.get_running_loop()
    shared = _shared_sessions.get(loop)
    if shared is None or shared.session.closed:
        shared = _shared_sessions[loop] = _SharedSession()
    shared.users += 1
    return shared


async def _release_shared(shared: _SharedSession) -> None:
    shared.users -= 1
    if shared.users == 0:
        loop = asyncio.get_running_loop()
        if _shared_sessions.get(loop) is shared:
            del _shared_sessions[loop]
        await shared.session.close()


class AiohttpTransport(PullTransport):
    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        super().__init__()
        self._session = session
        self._shared: _SharedSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        own = self._session is None
        if own:
            if self._shared is None:
                self._shared = _acquire_shared()
            session = self._shared.session
        else:
            assert self._session is not None
            session = self._session
            headers = {k: v for k, v in headers.items() if k.lower() != "cookie"}  # the caller's jar has them
        context = default_ssl_context(url, ssl)
        cookies: list[str] = []
        token = _handshake_cookies.set(cookies if own else None)
        try:
            self._ws = await self._ws_connect(session, url, headers, context, timeout)
        except BaseException:
            # No connection: hold no session (the driver may give up without closing us).
            await self._release()
            raise
        finally:
            _handshake_cookies.reset(token)
        return cookies

    async def _ws_connect(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        context: ssl_module.SSLContext | None,
        timeout: float,
    ) -> aiohttp.ClientWebSocketResponse:
        safe = redact(url)
        try:
            return await session.ws_connect(
                url,
                headers=headers,
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
            closed = TransportClosed(int(msg.data), str(msg.extra or ""))
        else:
            # CLOSED or ERROR: a loss unless a close code was recorded.
            closed = TransportClosed(self._ws.close_code or 1006)
        if self._ws.closed:
            # The connection is over: a reconnect takes the session again, an end needs none.
            # (While our close() is under way it still uses the session, and releases it itself.)
            await self._release()
        raise closed

    async def close(self, code: int = 1000) -> None:
        try:
            if self._ws is not None:
                await self._ws.close(code=code)
        finally:
            await self._release()

    async def abort(self) -> None:
        try:
            if self._ws is not None:
                # Closing the HTTP response drops its connection without a WebSocket close.
                self._ws._response.close()
        finally:
            await self._release()

    async def _release(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            await _release_shared(shared)
