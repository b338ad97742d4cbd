"""Messages straight from websockets' parser to the driver, on asyncio and trio alike.

websockets' connections queue each message for ``recv()``, and a reader task
takes it from there: two task switches per message before anyone sees it. Our
connections (subclasses of websockets' own, which invite it) give every data
frame to a :class:`Handoff` instead, which assembles messages and calls the
driver at once, inside the read that parsed them. Keepalive, closing and the
handshake stay websockets' own.
"""

from __future__ import annotations

import functools
import logging
import ssl as ssl_module
from abc import ABC, abstractmethod
from typing import Any, Protocol

import websockets
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as WebsocketsProtocol
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from sandbox_proto import SandboxConnectionError, redact

from ._transport import (
    CLOSE_TIMEOUT,
    MAX_MESSAGE_SIZE,
    PING_INTERVAL,
    PING_TIMEOUT,
    USER_AGENT,
    HandshakeRefused,
    Inbox,
    Receiver,
    Spawn,
    TransportClosed,
    default_ssl_context,
)


class Handoff(Inbox):
    """websockets' frames of one connection, assembled into messages for the driver."""

    __slots__ = ("_binary", "_fragments", "_protocol", "failed")

    def __init__(self, protocol: WebsocketsProtocol) -> None:
        super().__init__()
        self._protocol = protocol
        #: A text message was not UTF-8: the connection failed (1007) and must hang up.
        self.failed = False
        #: Frames of a fragmented message so far (empty when none is in progress).
        self._fragments: list[bytes] = []
        self._binary = False

    def take(self, frame: Frame) -> bool:
        """Assemble ``frame`` if it carries data; ``False`` for control frames.

        A text message that is not UTF-8 fails the connection with 1007, as
        websockets' own ``recv()`` would, and sets :attr:`failed`.
        """
        if self.failed:
            return True  # nothing more is processed on a failed connection (RFC 6455, 7.1.7)
        opcode = frame.opcode
        message: str | bytes
        try:
            if opcode is Opcode.TEXT and frame.fin:  # nearly every message
                message = str(frame.data, "utf-8")
            elif opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                self._binary = opcode is Opcode.BINARY
                if not frame.fin:
                    self._fragments = [bytes(frame.data)]
                    return True
                message = bytes(frame.data)
            elif opcode is Opcode.CONT:
                # websockets' parser already refused a continuation with no message to continue.
                self._fragments.append(bytes(frame.data))
                if not frame.fin:
                    return True
                data, self._fragments = b"".join(self._fragments), []
                message = data if self._binary else data.decode()
            else:
                return False
        except UnicodeDecodeError as exc:
            self._protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
            self.failed = True
            return True
        if (receiver := self.receiver) is not None:
            receiver.message_received(message)
        else:
            self._held.append(message)
        return True

    def lost(self, exc: ConnectionClosed) -> None:
        """The connection is over, with websockets' account of why (reported once)."""
        if self._over:
            return
        if exc.rcvd is not None:
            self._report_end(exc.rcvd.code, exc.rcvd.reason)
        elif exc.sent is not None and exc.sent.code != 1000:
            self._report_end(exc.sent.code, exc.sent.reason)  # ours, e.g. a keepalive timeout (1011)
        else:
            self._report_end(1006, "")


@functools.cache
def _proxy_for(host: str, port: int, secure: bool) -> str | None:
    """The proxy websockets would pick from the environment, read once per host and port.

    websockets reads it on every connect, by scanning the whole environment
    twice (~0.5 ms per connect here, a third of opening an idle sandbox).
    """
    scheme = "wss" if secure else "ws"
    return get_proxy(parse_uri(f"{scheme}://{host}:{port}/"))


#: Stands for every connection's handshake response once its headers are read.
_HANDSHAKE_DONE = Response(101, "Switching Protocols", Headers())


class _HandoffConnection(Protocol):
    """What both runtimes' connection subclasses have in common."""

    handoff: Handoff
    request: Request | None
    response: Response | None

    async def send(self, message: str) -> None: ...

    def pause_reading(self) -> None:
        """Stop reading the socket, and hold keepalive's verdict meanwhile."""
        ...

    def resume_reading(self) -> None: ...


class WebsocketsTransportBase(ABC):
    """What the websockets transports of asyncio and trio share: options, errors, delivery."""

    #: What means "cannot connect" (a runtime adds its own).
    connect_errors: tuple[type[Exception], ...] = (
        OSError,
        websockets.InvalidHandshake,
        websockets.InvalidURI,
        ssl_module.SSLError,
    )

    def __init__(
        self,
        library_logger: logging.Logger,
        *,
        ping_interval: float | None = PING_INTERVAL,
        ping_timeout: float | None = PING_TIMEOUT,
    ) -> None:
        self._logger = library_logger
        #: Handed to websockets, whose keepalive (the runtimes' ``keepalive`` overrides) reads them.
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ws: _HandoffConnection | None = None

    @abstractmethod
    async def _open(self, url: str, options: dict[str, Any]) -> _HandoffConnection:
        """Call the runtime's ``connect`` with ``options``."""

    async def connect(
        self, url: str, headers: dict[str, str], *, ssl: ssl_module.SSLContext | None, timeout: float
    ) -> list[str]:
        safe = redact(url)
        options: dict[str, Any] = {
            "additional_headers": headers,
            "open_timeout": timeout,
            "ping_interval": self._ping_interval,
            "ping_timeout": self._ping_timeout,
            "close_timeout": CLOSE_TIMEOUT,
            "max_size": MAX_MESSAGE_SIZE,
            "user_agent_header": USER_AGENT,
            "logger": self._logger,
            "ssl": default_ssl_context(url, ssl),
        }
        try:
            uri = parse_uri(url)
        except websockets.InvalidURI as exc:
            raise SandboxConnectionError(f"{safe}: cannot connect: {redact(str(exc))}") from None
        options["proxy"] = _proxy_for(uri.host, uri.port, uri.secure)
        try:
            ws = await self._open(url, options)
        except websockets.InvalidStatus as exc:
            raise HandshakeRefused(safe, exc.response.status_code) from None
        except TimeoutError:
            raise SandboxConnectionError(f"{safe}: no WebSocket handshake within {timeout:g}s") from None
        except self.connect_errors as exc:
            # Some errors have no text (ConnectionResetError()): their name is the reason then.
            raise SandboxConnectionError(f"{safe}: cannot connect: {redact(str(exc) or type(exc).__name__)}") from None
        assert ws.response is not None
        self._ws = ws
        cookies = ws.response.headers.get_all("Set-Cookie")
        # Read once; a thousand idle sandboxes need not keep their handshakes (~3 KiB each).
        # websockets only checks that a response came (``response is not None``).
        ws.request = None
        ws.response = _HANDSHAKE_DONE
        return cookies

    def start(self, receiver: Receiver, spawn: Spawn) -> None:
        assert self._ws is not None
        self._ws.handoff.start(receiver)

    def pause_reading(self) -> None:
        assert self._ws is not None
        self._ws.pause_reading()

    def resume_reading(self) -> None:
        assert self._ws is not None
        self._ws.resume_reading()

    async def send(self, text: str) -> None:
        assert self._ws is not None
        try:
            await self._ws.send(text)
        except websockets.ConnectionClosed as exc:
            raise TransportClosed(exc.rcvd.code if exc.rcvd is not None else 1006) from None
