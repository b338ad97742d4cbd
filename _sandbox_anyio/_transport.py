"""What every WebSocket transport offers the driver, and the settings they share.

A transport knows nothing of the protocol. It hands each message to a
:class:`Receiver` (the driver) as soon as it has it, from wherever it has it:
websockets' connections call it straight from their parsers, so a message
costs no task switch before the driver sees it. Libraries that only offer a
``recv()`` get the same shape from :class:`PullTransport`.

Every library's way of failing is mapped to one of two outcomes:
:class:`SandboxConnectionError` from ``connect`` (:class:`HandshakeRefused`
with the HTTP status when the upgrade was refused), and a close code (1006
for a loss): :meth:`Receiver.connection_lost`, or :class:`TransportClosed`
from ``send``.
"""

from __future__ import annotations

import functools
import logging
import ssl as ssl_module
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import certifi

from sandbox_proto import SandboxConnectionError

from ._process import Wakeup
from ._runtime import ANYIO, Runtime

logger = logging.getLogger("sandbox")

#: Starts a background task: an asyncio task, or a trio nursery's ``start_soon``.
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]

#: Both directions, every transport: the server accepts frames up to 16 MiB (1.1).
MAX_MESSAGE_SIZE = 16 * 2**20
#: Keepalive like uvicorn and upstream's client: a ping every 20 s, 20 s to answer
#: (the defaults of the ``ping_interval``/``ping_timeout`` options; ``None`` turns either off).
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
        if http_status == 401:
            hint = " (behind Cloud Run IAM: check the Authorization header and the roles/run.invoker role)"
        elif http_status == 403:
            # Cloud Run IAM refuses with 403, and so do servers (ours) for a path that is no endpoint.
            hint = (
                " (a URL with a wrong path: give the service's root URL; or, behind Cloud Run IAM,"
                " check the Authorization header and the roles/run.invoker role)"
            )
        elif http_status == 404:
            hint = " (no sandbox endpoint under this URL: give the service's root URL)"
        super().__init__(f"{safe_url}: server refused the WebSocket with HTTP {http_status}{hint}")
        self.http_status = http_status


class Receiver(Protocol):
    """Where a transport delivers: called synchronously, in order, never concurrently."""

    def message_received(self, message: str | bytes) -> None: ...

    def connection_lost(self, code: int, reason: str) -> None:
        """The connection is over (called once, after the last message)."""
        ...


class Inbox:
    """What one connection received, on its way to the driver.

    Until :meth:`start` (the driver is not ready before ``connect`` returns)
    messages and the end are held, then delivered in order. Subclasses hand a
    message to :attr:`receiver` when it is set, else append it to ``_held``
    (inline: it is the path of every message), and report the end once with
    :meth:`_report_end`.
    """

    __slots__ = ("_held", "_lost", "_over", "receiver")

    def __init__(self) -> None:
        self.receiver: Receiver | None = None
        self._held: list[str | bytes] = []
        self._lost: tuple[int, str] | None = None
        #: The end was reported (or held): nothing more is delivered.
        self._over = False

    def _report_end(self, code: int, reason: str) -> None:
        self._over = True
        if self.receiver is not None:
            self.receiver.connection_lost(code, reason)
        else:
            self._lost = code, reason

    def start(self, receiver: Receiver) -> None:
        held, self._held = self._held, []
        for message in held:
            receiver.message_received(message)
        self.receiver = receiver
        if self._lost is not None:
            receiver.connection_lost(*self._lost)


class Transport(Protocol):
    """One WebSocket connection at a time; the driver makes a new connect for a reconnect.

    Keepalive is the transport's own: each takes ``ping_interval`` and ``ping_timeout`` in
    its constructor, and a connection whose pong does not come within ``ping_timeout`` is
    dropped at once and reported to :meth:`Receiver.connection_lost` (1011 or 1006), without
    waiting for a closing handshake that a vanished peer would never answer. Not while
    :meth:`pause_reading` is in effect, though (see :class:`ReadingGate`).
    """

    cancel_safe_send: bool
    """Whether cancelling :meth:`send` can never leave part of a frame on the wire.

    True when the library puts the whole frame into its write buffer before its first
    await, so a cancelled send has sent all of the frame or none of it. When False, a
    send cancelled midway may have written half a frame and the connection is unusable:
    shield the send, or drop the connection after cancelling one.
    """

    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        """Open the WebSocket; return the handshake response's Set-Cookie values.

        Messages that arrive before :meth:`start` are held for it.
        """
        ...

    def start(self, receiver: Receiver, spawn: Spawn) -> None:
        """Deliver the held messages, then every later one, then the end, to ``receiver``."""
        ...

    def pause_reading(self) -> None:
        """Stop reading the socket (back-pressure) until :meth:`resume_reading`.

        Meanwhile keepalive declares nothing dead (an unread pong proves nothing); it starts
        a fresh ping/timeout cycle once reading resumes.
        """
        ...

    def resume_reading(self) -> None: ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int = 1000) -> None: ...

    async def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""
        ...


class ReadingGate:
    """Whether the socket is being read, as keepalive needs to know.

    While the driver holds reading paused (back-pressure), a pong waits unread
    behind the output nobody reads: a missed pong then says nothing about the
    peer. Keepalive sends no ping while paused, and gives no verdict on a ping
    whose wait saw a pause; once reading resumes it starts a fresh cycle.
    """

    __slots__ = ("_pauses", "_resumed", "paused")

    def __init__(self, runtime: Runtime = ANYIO) -> None:
        self.paused = False
        #: Pauses so far: a cycle that began at another count saw one.
        self._pauses = 0
        self._resumed = Wakeup(runtime)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._pauses += 1

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()

    async def wait_reading(self) -> int:
        """Wait until reading is not paused; return a mark for :meth:`paused_since`."""
        while self.paused:
            await self._resumed.wait()
        return self._pauses

    def paused_since(self, mark: int) -> bool:
        """Whether reading is paused now or was paused since :meth:`wait_reading` gave ``mark``."""
        return self.paused or self._pauses != mark


class PullTransport(ABC):
    """A :class:`Transport` for libraries that only offer ``recv()``: a task reads and delivers."""

    def __init__(self, runtime: Runtime = ANYIO) -> None:
        #: Paused by the driver; a subclass's keepalive asks it before calling a peer dead.
        self._reading = ReadingGate(runtime)

    @abstractmethod
    async def recv(self) -> str | bytes:
        """The next message; :class:`TransportClosed` once the connection is over."""

    @abstractmethod
    async def abort(self) -> None: ...

    def start(self, receiver: Receiver, spawn: Spawn) -> None:
        self._reading.resume()  # a new connection: whatever paused the last one is over
        spawn(functools.partial(self._pump, receiver))

    async def _pump(self, receiver: Receiver) -> None:
        while True:
            try:
                message = await self.recv()
            except TransportClosed as closed:
                receiver.connection_lost(closed.code, closed.reason)
                return
            except Exception as exc:  # a library's surprise must not leave the driver waiting
                logger.exception("reading the WebSocket failed")
                await self.abort()
                receiver.connection_lost(1006, f"transport failed: {type(exc).__name__}")
                return
            receiver.message_received(message)
            await self._reading.wait_reading()

    def pause_reading(self) -> None:
        self._reading.pause()

    def resume_reading(self) -> None:
        self._reading.resume()


def default_ssl_context(url: str, ssl: ssl_module.SSLContext | None) -> ssl_module.SSLContext | None:
    """The TLS context for ``url``: certifi's CA bundle unless the caller gave one.

    A context given for a plain ``ws://`` URL is ignored rather than refused, so
    the upstream examples (which always pass one) also run against a local server.
    """
    if not url.startswith("wss://"):
        return None
    return ssl or ssl_module.create_default_context(cafile=certifi.where())
