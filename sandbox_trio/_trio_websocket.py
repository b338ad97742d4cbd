"""The other trio transport, on ``trio-websocket`` (``transport="trio-websocket"``).

One task per connection: trio-websocket's own reading task, run by ours (so
none of its errors reaches the sandbox's nursery). It hands each message to
the driver as it is parsed, instead of queueing it for ``get_message()`` and a
reader task of ours, and it runs keepalive between its reads (trio-websocket
sends no pings of its own). While the driver pauses reading it waits inside
that hand-over: nothing more is read (back-pressure), and keepalive holds its
verdict (see :class:`ReadingGate`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl as ssl_module
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping

from _sandbox_anyio import (
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    PING_TIMEOUT,
    USER_AGENT,
    HandshakeRefused,
    Receiver,
    Spawn,
    TransportClosed,
    default_ssl_context,
)
from _sandbox_anyio._transport import Inbox, ReadingGate
from sandbox_proto import RedactingFilter, SandboxConnectionError, redact

from ._runtime import TRIO

# trio-websocket logs every URL it connects to, token included.
logging.getLogger("trio-websocket").addFilter(RedactingFilter())
logger = logging.getLogger("sandbox_trio")


class _Delivery(Inbox):
    """Stands in for both ends of trio-websocket's message channel: messages go straight to the driver.

    trio-websocket's reading task ``send``s each message here and closes it once
    the connection is over; its ``aclose()`` (ours, or a 1009) closes it too,
    so the end is reported as early as ``get_message()`` would have raised.
    Until :meth:`start` messages and the end are held.
    """

    __slots__ = ("_reading", "_ws")

    def __init__(self, reading: ReadingGate) -> None:
        super().__init__()
        self._reading = reading
        self._ws: WebSocketConnection | None = None

    async def send(self, message: str | bytes) -> None:
        if self._over:
            return  # closed: trio-websocket's channel would refuse it, and the reader drops it
        if (receiver := self.receiver) is not None:
            receiver.message_received(message)
        else:
            self._held.append(message)
        if self._reading.paused:
            # Back-pressure: trio-websocket's reader, waiting here, reads nothing more.
            await self._reading.wait_reading()

    async def aclose(self) -> None:
        if self._over:
            return
        reason = None if self._ws is None else self._ws.closed
        if reason is None:
            self._report_end(1006, "")
        else:
            self._report_end(reason.code, reason.reason or "")

    async def __aenter__(self) -> _Delivery:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class _Connection(WebSocketConnection):
    """trio-websocket's client connection, delivering through a :class:`_Delivery`."""

    def __init__(
        self, stream: trio.abc.Stream, delivery: _Delivery, opened: Callable[[_Connection], None], **options: Any
    ) -> None:
        super().__init__(stream, WSConnection(ConnectionType.CLIENT), **options)
        delivery._ws = self
        # Its reading task only sends to the one and closes both: no queue, and no task to empty it.
        self._send_channel = self._recv_channel = delivery  # type: ignore[assignment]
        self._opened = opened

    async def _handle_accept_connection_event(self, event: AcceptConnection) -> None:
        await super()._handle_accept_connection_event(event)
        self._opened(self)


class _Keepalive(trio.abc.Stream):
    """The connection's stream, pinging between reads when nothing came for a while.

    Run by trio-websocket's reading task, so keepalive costs no task. A pong
    not read in time drops the connection (no closing handshake: the peer is
    gone); trio-websocket then reports 1006.
    """

    __slots__ = ("_due", "_interval", "_mark", "_pong", "_reading", "_sent_at", "_timeout", "transport_stream", "ws")

    def __init__(
        self, stream: trio.abc.Stream, reading: ReadingGate, mark: int, interval: float, timeout: float | None
    ) -> None:
        self.transport_stream = stream
        self.ws: WebSocketConnection | None = None
        self._reading = reading
        self._mark = mark
        self._interval = interval
        self._timeout = timeout
        self._sent_at = -math.inf
        self._pong: trio.Event | None = None
        #: When a ping is due, or its pong overdue.
        self._due = trio.current_time() + interval

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            # Cancelling a read loses nothing: trio checks for it only while no data has come.
            with trio.CancelScope(deadline=self._due):
                return await self.transport_stream.receive_some(max_bytes)
            await self._tick()

    async def _tick(self) -> None:
        pong, self._pong = self._pong, None
        now = trio.current_time()
        if self._reading.paused_since(self._mark):
            # Reading was paused in this cycle: its pong may have waited unread. A fresh cycle.
            self._mark = await self._reading.wait_reading()
            self._due = now + self._interval
            return
        if pong is not None and not pong.is_set():
            await self._drop()
        if now < self._sent_at + self._interval:  # answered early: the next ping is not due yet
            self._due = self._sent_at + self._interval
            return
        assert self.ws is not None
        payload = os.urandom(4)
        self._sent_at = now
        if self._timeout is None:
            self._due = now + self._interval
        else:
            self._pong = self.ws._pings[payload] = trio.Event()  # set by trio-websocket's pong handler
            self._due = now + self._timeout
        # The ping's write counts against the answer time: a full send buffer (the peer reads
        # nothing) would otherwise hold it forever.
        with trio.move_on_at(self._due if self._timeout is not None else math.inf) as sending:
            try:
                await self.ws._send(Ping(payload=payload))
            except ConnectionClosed:
                raise trio.ClosedResourceError from None
        if sending.cancelled_caught:
            await self._drop()

    async def _drop(self) -> None:
        # No closing handshake: trio-websocket's aclose() would wait for a reply without limit
        # (and TLS's close_notify could wait on a full buffer).
        logger.debug("keepalive ping timeout: dropping the connection")
        await trio.aclose_forcefully(self.transport_stream)
        raise trio.BrokenResourceError("keepalive ping timeout")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class TrioWebsocketTransport:
    #: No: send_message() awaits trio's send_all, which a cancel can stop partway through a frame.
    cancel_safe_send = False

    def __init__(
        self, *, ping_interval: float | None = PING_INTERVAL, ping_timeout: float | None = PING_TIMEOUT
    ) -> None:
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        #: Set by the sandbox before connecting: where the connection's task runs.
        self.nursery: trio.Nursery | None = None
        self._ws: WebSocketConnection | None = None
        self._stream: trio.abc.Stream | None = None
        # Per connection, so a pause of the last one (whose reader may still wait in it) is not this one's.
        self._reading = ReadingGate(TRIO)
        self._delivery: _Delivery | None = None

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
        """Connect, then run trio-websocket's reading task here, catching its errors.

        Before ``started`` (the handshake's answer) an error fails ``connect``; after it,
        the connection is just over (the driver hears of it), and nothing is raised into
        the sandbox's nursery.
        """
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        started = False

        def opened(ws: _Connection) -> None:
            nonlocal started
            started = True
            task_status.started(ws)

        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        try:
            if context is None:
                stream = await trio.open_tcp_stream(host, port)
            else:
                stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context, https_compatible=True)
                # trio-websocket would handshake in its reading task, where a bad certificate
                # would only end the task: fail here instead.
                await stream.do_handshake()
            self._stream = stream
            self._reading = reading = ReadingGate(TRIO)
            self._delivery = delivery = _Delivery(reading)
            wrapped: trio.abc.Stream = stream
            if self._ping_interval is not None:
                mark = await reading.wait_reading()  # a new gate: returns at once
                wrapped = _Keepalive(stream, reading, mark, self._ping_interval, self._ping_timeout)
            ws = _Connection(
                wrapped,
                delivery,
                opened,
                host=host if parts.port is None else f"{host}:{port}",
                path=resource,
                client_extra_headers=extra,
                max_message_size=MAX_MESSAGE_SIZE,
            )
            if isinstance(wrapped, _Keepalive):
                wrapped.ws = ws
            await ws._reader_task()
            if not started:
                raise trio.BrokenResourceError("the connection closed during the WebSocket handshake")
        except Exception:
            if not started:
                raise
            logger.debug("trio-websocket connection ended with an error", exc_info=True)
        finally:
            if stream is not None:
                # Nothing reads it any more; trio-websocket leaves closing it to the garbage collector.
                await trio.aclose_forcefully(stream)

    def start(self, receiver: Receiver, spawn: Spawn) -> None:
        assert self._delivery is not None
        self._delivery.start(receiver)

    def pause_reading(self) -> None:
        self._reading.pause()

    def resume_reading(self) -> None:
        self._reading.resume()

    async def send(self, text: str) -> None:
        assert self._ws is not None
        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
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
        """Close the socket: trio-websocket leaves that to the garbage collector."""
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
