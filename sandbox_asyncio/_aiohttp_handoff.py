"""Messages straight from aiohttp's parser to the driver: no reader task.

aiohttp's protocol hands every socket read to the connection's parser (its
``_payload_parser``), which puts each message into the connection's queue
(``ws._reader``) for ``receive()``: read by a task, a task switch and a loop
turn per message, and a task per idle connection. A :class:`Handoff` takes the
parser's place on the protocol: it lets aiohttp's parser fill the queue as
before, then at once takes the data messages out of it and gives them to the
driver, inside the read that parsed them.

The rest stays aiohttp's. Its queue's bounds: while the driver pauses, messages
wait there and aiohttp stops reading the socket once it is full. Its
heartbeat, which counts every read as a sign of life. Its ``receive()``, which a
task calls once the queue holds what ends the connection (the peer's close
frame, a protocol error, the end of the stream): the closing handshake and the
close codes are aiohttp's own. Only a ping is answered here, as ``receive()``
would.

The queue is taken from by driving its ``read()`` by hand: with a message in
the queue it returns without suspending, and it is the one way (in aiohttp's
compiled queue) to take a message with the queue's size accounting, which
its bounds and its parser's resumption rest on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import WSMessage, WSMsgType
from aiohttp.client_proto import ResponseHandler

from _sandbox_anyio import Receiver

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG

#: asyncio keeps only weak references to tasks: ours are held here until they end. Not the
#: driver's ``spawn``, which is its sandbox's method: kept here, it would keep a sandbox its
#: user dropped alive (through aiohttp's protocol, which holds the handoff).
_tasks: set[asyncio.Task[None]] = set()


class Handoff:
    """One connection's stand-in for aiohttp's parser, delivering to the driver.

    Until :meth:`start` messages are held in aiohttp's queue (the driver is not
    ready before ``connect`` returns), then delivered in order; ``end`` is
    started once, after the last message, to finish the connection.
    """

    __slots__ = ("_end", "_over", "_parser", "_paused", "_queue", "_receiver", "_ws")

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        handler: ResponseHandler | None,
        end: Callable[[Receiver], Coroutine[Any, Any, None]],
    ) -> None:
        self._ws = ws
        self._queue = ws._reader
        self._parser = ws._parser
        self._end = end
        self._receiver: Receiver | None = None
        self._paused = False
        self._over = False
        # Not the protocol's parser any more: a protocol error or the connection's end came with
        # the handshake, and is in the queue already.
        if handler is not None and self._parser is not None and handler._payload_parser is self._parser:
            handler._payload_parser = self

    # What aiohttp's protocol calls on its parser.

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        assert self._parser is not None
        result = self._parser.feed_data(data)
        self.deliver()
        return result

    def feed_eof(self) -> None:
        assert self._parser is not None
        self._parser.feed_eof()
        self.deliver()

    # What the transport calls.

    def start(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.deliver()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        # From the next loop turn: the driver resumes from its user's read, not expecting a delivery.
        self._ws._loop.call_soon(self.deliver)

    def deliver(self) -> None:
        """Hand over what aiohttp's queue holds; start the end once it holds the connection's end."""
        receiver = self._receiver
        if receiver is None or self._paused or self._over:
            return
        ws, buffer = self._ws, self._queue._buffer
        # Once aiohttp's close() has begun, it reads the queue itself up to the peer's close frame.
        while buffer and not ws._closed:
            kind = buffer[0][0].type
            if kind is _TEXT or kind is _BINARY:
                receiver.message_received(self._take().data)
                if self._paused:
                    return
            elif kind is _PING:
                self._run(_pong(ws, self._take().data))
            elif kind is _PONG:
                self._take()  # as receive() does: aiohttp's heartbeat already saw the read
            else:
                break  # the peer's close frame, for receive() to answer
        if (buffer and not ws._closed) or self._queue.is_eof():  # is_eof: an error too
            self._over = True
            self._run(self._end(receiver))

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = self._ws._loop.create_task(coroutine)
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    def _take(self) -> WSMessage:
        read = self._queue.read()
        try:
            read.send(None)
        except StopIteration as done:
            message: WSMessage = done.value
            return message
        read.close()  # suspended on a wait of its own: not to be resumed by anyone
        raise AssertionError("aiohttp's queue waited with a message in it")


async def _pong(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> None:
    # A write that fails means the connection is ending: its end reaches the driver through the queue.
    with contextlib.suppress(aiohttp.ClientError, ConnectionError):
        await ws.pong(data)
