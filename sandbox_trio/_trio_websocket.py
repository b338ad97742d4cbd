"""The other trio transport, on ``trio-websocket`` (``transport="trio-websocket"``).

trio-websocket sends no keepalive pings, so this transport runs its own
(``ping_interval``/``ping_timeout``, as the other transports) in the sandbox's
nursery, where the library's connection tasks also run. Like the others, it
holds its verdict while the driver pauses reading (back-pressure).
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl as ssl_module
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from _sandbox_anyio import (
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    PING_TIMEOUT,
    USER_AGENT,
    HandshakeRefused,
    PullTransport,
    TransportClosed,
    default_ssl_context,
)
from sandbox_proto import RedactingFilter, SandboxConnectionError, redact

from ._runtime import TRIO

# trio-websocket logs every URL it connects to, token included.
logging.getLogger("trio-websocket").addFilter(RedactingFilter())
logger = logging.getLogger("sandbox_trio")


class TrioWebsocketTransport(PullTransport):
    #: No: send_message() awaits trio's send_all, which a cancel can stop partway through a frame.
    cancel_safe_send = False

    def __init__(
        self, *, ping_interval: float | None = PING_INTERVAL, ping_timeout: float | None = PING_TIMEOUT
    ) -> None:
        super().__init__(TRIO)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        #: Set by the sandbox before connecting: where the connection's tasks run.
        self.nursery: trio.Nursery | None = None
        self._ws: WebSocketConnection | None = None
        self._stream: trio.abc.Stream | None = None
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
                self._ws = await self.nursery.start(self._run, url, default_ssl_context(url, ssl), extra)
        except trio.TooSlowError:
            raise SandboxConnectionError(f"{safe}: no WebSocket handshake within {timeout:g}s") from None
        except Exception as exc:
            cause = _leaf(exc)
            if isinstance(cause, ConnectionRejected):
                raise HandshakeRefused(safe, cause.status_code) from None
            if isinstance(cause, HandshakeError | OSError | ssl_module.SSLError | trio.BrokenResourceError):
                raise SandboxConnectionError(f"{safe}: cannot connect: {redact(str(cause))}") from None
            raise
        return [value.decode("latin-1") for name, value in self._ws.handshake_headers if name == b"set-cookie"]

    async def _run(
        self,
        url: str,
        context: ssl_module.SSLContext | None,
        extra: list[tuple[bytes, bytes]],
        *,
        task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Own the connection's tasks in a private nursery, so none of its errors reach the caller's.

        Before ``started`` an error fails ``connect``; after it, the connection is just closed
        (``recv`` reports that), and nothing is raised into the sandbox's nursery.
        """
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        started = False
        try:
            async with trio.open_nursery() as private:
                stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
                if context is None:
                    stream = await trio.open_tcp_stream(host, port)
                else:
                    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context, https_compatible=True)
                    # trio-websocket would handshake in a background task, where a bad
                    # certificate surfaces as a hang: fail here instead.
                    await stream.do_handshake()
                self._stream = stream
                ws = await wrap_client_stream(
                    private,
                    stream,
                    host if parts.port is None else f"{host}:{port}",
                    resource,
                    extra_headers=extra,
                    max_message_size=MAX_MESSAGE_SIZE,
                    message_queue_size=16,
                )
                self._keepalive_scope.cancel()
                self._keepalive_scope = trio.CancelScope()
                started = True
                task_status.started(ws)
                if self._ping_interval is not None:
                    # Here, in the task that waits for the connection's end anyway: no task of its own.
                    await self._keepalive(ws, stream, self._ping_interval, self._keepalive_scope)
        except Exception:
            if not started:
                raise
            logger.debug("trio-websocket connection ended with an error", exc_info=True)

    async def _keepalive(
        self, ws: WebSocketConnection, stream: trio.abc.Stream, interval: float, scope: trio.CancelScope
    ) -> None:
        with scope:
            while ws.closed is None:
                # No ping while reading is paused: its pong would wait unread behind the held
                # messages (trio-websocket stops reading once its queue is full). See ReadingGate.
                mark = await self._reading.wait_reading()
                await trio.sleep(interval)
                if self._reading.paused_since(mark):
                    continue  # a fresh cycle once reading resumes
                # ping() sends and then waits for the pong: the send counts against the answer time,
                # since a full send buffer (the peer reads nothing) would otherwise hold it forever.
                with trio.move_on_after(math.inf if self._ping_timeout is None else self._ping_timeout) as waiting:
                    try:
                        await ws.ping()
                    except ConnectionClosed:
                        return
                if waiting.cancelled_caught:
                    if self._reading.paused_since(mark):
                        continue  # the pong may be waiting unread behind the held messages
                    # No closing handshake: trio-websocket's aclose() would wait for a reply without
                    # limit (and TLS's close_notify could wait on a full buffer). Closing the socket
                    # ends the connection; recv() then reports 1006.
                    logger.debug("keepalive ping timeout: dropping the connection")
                    await trio.aclose_forcefully(stream)
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
            await self._release()
            raise _closed(exc) from None

    async def close(self, code: int = 1000) -> None:
        try:
            if self._ws is not None:
                await self._ws.aclose(code)
        finally:
            await self._release()

    async def abort(self) -> None:
        await self._release()

    async def _release(self) -> None:
        """Stop the keepalive and close the socket: trio-websocket leaves that to the garbage collector."""
        self._keepalive_scope.cancel()
        if self._stream is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, OSError):
                await self._stream.aclose()


def _closed(exc: ConnectionClosed) -> TransportClosed:
    if exc.reason is None:
        return TransportClosed(1006)
    return TransportClosed(exc.reason.code, exc.reason.reason or "")


def _leaf(exc: BaseException) -> BaseException:
    """The error inside the exception groups that nurseries wrap it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
