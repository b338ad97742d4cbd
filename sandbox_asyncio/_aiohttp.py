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

Messages go from aiohttp's parser to the driver inside the socket read (see
``_aiohttp_handoff``): no reader task.

Keepalive is aiohttp's ``heartbeat``: a ping after ``ping_interval`` seconds
without incoming data, the connection dropped (1006) when nothing comes back
within ``ping_timeout`` (aiohttp itself would allow half the interval). It is
switched off while the driver pauses reading, and re-armed when it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ssl as ssl_module
import weakref
from types import SimpleNamespace

import aiohttp
import anyio
from aiohttp.client_proto import ResponseHandler

from _sandbox_anyio import (
    CLOSE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    PING_TIMEOUT,
    HandshakeRefused,
    Receiver,
    Spawn,
    TransportClosed,
    default_ssl_context,
)
from _sandbox_anyio._transport import logger
from sandbox_proto import SandboxConnectionError, redact

from ._aiohttp_handoff import Handoff

#: The pong wait when ``ping_timeout=None``: aiohttp always sets one, so make it a day.
_NO_PONG_LIMIT = 86400.0

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


class AiohttpTransport:
    #: aiohttp writes the whole (uncompressed) frame to asyncio's transport before its only await (drain).
    cancel_safe_send = True

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        ping_interval: float | None = PING_INTERVAL,
        ping_timeout: float | None = PING_TIMEOUT,
    ) -> None:
        self._session = session
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._shared: _SharedSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        #: The connection's socket and aiohttp's protocol on it: closing it is only started by
        #: aiohttp, and seen done through the protocol's ``closed`` future.
        self._socket: asyncio.Transport | None = None
        self._handler: ResponseHandler | None = None
        self._handoff: Handoff | None = None
        #: Made when the connection's end begins, set when it is over (a second caller waits for it).
        self._finished: anyio.Event | None = None

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
            ws = await self._ws_connect(session, url, headers, context, timeout)
        except BaseException:
            # No connection: hold no session (the driver may give up without closing us).
            await self._release()
            raise
        finally:
            _handshake_cookies.reset(token)
        self._ws = ws
        self._finished = None
        connection = ws._response.connection
        self._handler = connection.protocol if connection is not None else None
        self._socket = self._handler.transport if self._handler is not None else None
        self._handoff = Handoff(ws, self._handler, self._end)
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
            # ws_connect's own timeout= covers only receiving and closing; the handshake runs under
            # the session's ClientTimeout (300 s by default, and the caller's own with their session).
            async with asyncio.timeout(timeout):
                ws = await session.ws_connect(
                    url,
                    headers=headers,
                    ssl=context if context is not None else True,
                    # aiohttp pings only when asked: after heartbeat=N seconds without incoming data.
                    heartbeat=self._ping_interval,
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
        if self._ping_interval is not None and hasattr(ws, "_pong_heartbeat"):
            # aiohttp waits heartbeat/2 for the pong, with no option: set the wait ourselves (read
            # when the ping is sent, and none is sent before the interval, so in time).
            ws._pong_heartbeat = self._ping_timeout if self._ping_timeout is not None else _NO_PONG_LIMIT
        return ws

    def start(self, receiver: Receiver, spawn: Spawn) -> None:
        assert self._handoff is not None
        self._handoff.start(receiver)

    def pause_reading(self) -> None:
        assert self._handoff is not None
        self._handoff.pause()
        ws = self._ws
        if ws is not None and self._ping_interval is not None:
            # Once aiohttp's queue is full it stops reading the socket, and a pong would wait
            # unread behind our held messages: no ping, no pong deadline until reading resumes.
            # aiohttp has no switch for this. ``_heartbeat = None`` is how it runs without a
            # heartbeat (its timers and its data callback check it first), and
            # ``_cancel_heartbeat()`` is what its own close calls; a ping already being written
            # is not torn, as aiohttp writes a whole frame before its first await.
            ws._heartbeat = None
            ws._cancel_heartbeat()

    def resume_reading(self) -> None:
        ws = self._ws
        if ws is not None and self._ping_interval is not None and not (ws.closed or ws._closing):
            ws._heartbeat = self._ping_interval
            # A fresh cycle: a ping after an interval without data, as after connecting.
            ws._reset_heartbeat()
        assert self._handoff is not None
        self._handoff.resume()

    async def send(self, text: str) -> None:
        assert self._ws is not None
        if self._ws.closed:
            raise TransportClosed(self._ws.close_code or 1006)
        try:
            await self._ws.send_str(text)
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransportClosed(1006, str(exc)) from None

    async def _end(self, receiver: Receiver) -> None:
        """Run once aiohttp's queue holds the connection's end: report it after the last message."""
        try:
            closed = await self._receive_end()
        except Exception as exc:  # a library's surprise must not leave the driver waiting
            logger.exception("reading the WebSocket failed")
            await self.abort()
            receiver.connection_lost(1006, f"transport failed: {type(exc).__name__}")
            return
        receiver.connection_lost(closed.code, closed.reason)

    async def _receive_end(self) -> TransportClosed:
        """aiohttp's ``receive()`` on the connection's end: its closing handshake and close code."""
        assert self._ws is not None
        msg = await self._ws.receive()
        if msg.type is aiohttp.WSMsgType.CLOSE:
            closed = TransportClosed(int(msg.data), str(msg.extra or ""))
        else:
            # CLOSED or ERROR: a loss unless a close code was recorded.
            closed = TransportClosed(self._ws.close_code or 1006)
        if self._ws.closed:
            # The connection is over: a reconnect takes the session again, an end needs none.
            # After a loss (a missed pong, say) aiohttp only starts a graceful close: drop it.
            await self._finish(abort=closed.code == 1006)
        return closed

    async def close(self, code: int = 1000) -> None:
        graceful = False
        try:
            if self._ws is not None and not self._ws.closed:
                await self._ws.close(code=code)
            graceful = True
        finally:
            await self._finish(abort=not graceful)

    async def abort(self) -> None:
        await self._finish(abort=True)

    async def _finish(self, *, abort: bool) -> None:
        """Close the connection's socket and release the session; return once both are done.

        aiohttp only starts closing a socket (the rest happens a loop turn or more later), and
        a connection it saw lost is never handed back to its pool: done here, so nothing is
        left for the garbage collector to warn about. Shielded (the driver may be cancelling
        us), each step bounded by :data:`CLOSE_TIMEOUT`; a second call waits for the first.
        """
        with anyio.CancelScope(shield=True):
            if self._finished is not None:
                if abort and self._socket is not None:
                    self._socket.abort()  # hurry the graceful close under way
                await self._finished.wait()
                return
            self._finished = finished = anyio.Event()
            try:
                await self._close_socket(abort)
                await self._release()
            finally:
                self._socket = self._handler = None
                finished.set()

    async def _close_socket(self, abort: bool) -> None:
        ws, socket, handler = self._ws, self._socket, self._handler
        if ws is None or handler is None:
            return
        closed = handler.closed  # made now, while the socket is open; None once it is closed
        if abort and socket is not None:
            socket.abort()
        ws._response.close()  # hands the connection back to aiohttp, closing the socket if open
        if closed is None:
            return
        with anyio.move_on_after(CLOSE_TIMEOUT):
            await _outcome(closed)
        if not closed.done() and socket is not None:
            socket.abort()  # a graceful close stuck behind unsent data (the peer reads nothing)
            with anyio.move_on_after(CLOSE_TIMEOUT):
                await _outcome(closed)

    async def _release(self) -> None:
        """Give the shared session back (the last user closes it), whatever cancels us meanwhile."""
        shared, self._shared = self._shared, None
        if shared is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await _release_shared(shared)


async def _outcome(future: asyncio.Future[None]) -> None:
    """Wait for ``future`` without cancelling it, whatever it ends with."""
    with contextlib.suppress(Exception):
        await asyncio.shield(future)
