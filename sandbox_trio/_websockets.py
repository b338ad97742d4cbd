"""The default trio transport, on ``websockets``' trio API.

As on asyncio, messages go from websockets' parser to the driver inside the
connection's own reading task (see ``_sandbox_anyio._handoff``). The
connection's tasks (reading, keepalive) run in the sandbox's nursery;
websockets catches and logs their errors, so none reaches the nursery.
Keepalive is websockets' own, except that an unanswered ping drops the
connection at once, and that it holds its verdict while the driver pauses
reading (back-pressure).
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame
from websockets.protocol import Event, State
from websockets.trio.client import ClientConnection, connect

from _sandbox_anyio import CLOSE_TIMEOUT, PING_INTERVAL, PING_TIMEOUT, Handoff, WebsocketsTransportBase
from _sandbox_anyio._transport import ReadingGate
from sandbox_proto import RedactingFilter

from ._runtime import TRIO

#: Handed to websockets, whose debug log shows request lines and frames with the token.
library_logger = logging.getLogger("sandbox_trio.websockets")
library_logger.addFilter(RedactingFilter())


#: Bytes per socket read, as asyncio reads; trio's default is 64 KiB.
READ_SIZE = 256 * 1024


class _LargeReads(trio.abc.HalfCloseableStream):
    """A TCP stream whose reads take up to :data:`READ_SIZE`.

    websockets reads with ``receive_some()`` and trio's default size; every read
    is a trip through trio's scheduler, which for large outputs costs ~10 % of
    the throughput (``python -m bench --only throughput --transports trio``).
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.transport_stream = stream

    @property
    def socket(self) -> Any:
        """For websockets' ``local_address``/``remote_address``."""
        return getattr(self.transport_stream, "socket", None)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes or READ_SIZE)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class _connect(connect):
    async def open_tcp_stream(self) -> trio.abc.Stream:
        stream = await super().open_tcp_stream()
        return _LargeReads(stream) if isinstance(stream, trio.abc.HalfCloseableStream) else stream


class _Connection(ClientConnection):
    """websockets' connection, handing messages over as they are parsed instead of queueing them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # its reading task starts later, at a checkpoint
        self.handoff = Handoff(self.protocol)
        self.reading = ReadingGate(TRIO)

    def process_event(self, event: Event) -> None:
        if self.response is None or not isinstance(event, Frame) or not self.handoff.take(event):
            super().process_event(event)
        elif self.handoff.failed:
            self.nursery.start_soon(self._hang_up)

    async def _hang_up(self) -> None:
        """Send the close frame of a failed connection, then drop it."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.send_data()
        await trio.aclose_forcefully(self.stream)  # the reading task then ends, through close_stream

    async def close_stream(self) -> None:
        await super().close_stream()
        self.reading.resume()  # nothing more is read: a keepalive waiting for reading sees the end
        self.handoff.lost(self.protocol.close_exc)

    def pause_reading(self) -> None:
        self.reading.pause()
        super().pause_reading()

    def resume_reading(self) -> None:
        super().resume_reading()
        self.reading.resume()

    async def keepalive(self) -> None:
        """websockets' keepalive, but a ping left unanswered drops the connection at once.

        websockets would start a closing handshake and wait ``close_timeout`` for a peer
        that is gone; and the ping's own write counts against ``ping_timeout``, since a
        full send buffer (the peer reads nothing) would otherwise hold it forever.

        While reading is paused no ping is sent and no pong is missed (see
        :class:`ReadingGate`); a fresh cycle starts once it resumes.
        """
        assert self.ping_interval is not None
        try:
            while True:
                mark = await self.reading.wait_reading()
                # A pong later than the interval (but in time) delays the next ping, as in websockets.
                with trio.move_on_after(max(self.ping_interval - self.latency, 0)):
                    await self.stream_closed.wait()
                    return
                if self.reading.paused_since(mark):
                    continue  # its pong could not be read before reading resumes
                if self.ping_timeout is None:
                    await self.ping()
                    continue
                with trio.move_on_after(self.ping_timeout) as waiting:
                    pong_received = await self.ping(ack_on_close=True)
                    await pong_received.wait()
                if waiting.cancelled_caught:
                    if self.reading.paused_since(mark):
                        continue  # the pong may be waiting unread behind the held output
                    if self.debug:
                        self.logger.debug("- timed out waiting for keepalive pong")
                    if self.protocol.state is State.OPEN:
                        self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                        # Not sent: it could wait behind a full send buffer, and the peer is gone.
                        self.protocol.data_to_send()
                    await self.close_stream()  # 1011 reaches the driver
                    return
        except ConnectionClosed:
            return
        except Exception:
            self.logger.error("keepalive ping failed", exc_info=True)


class WebsocketsTransport(WebsocketsTransportBase):
    _ws: _Connection | None
    connect_errors = (*WebsocketsTransportBase.connect_errors, trio.BrokenResourceError)
    #: No: send() awaits trio's send_all, which a cancel can stop partway through a frame.
    cancel_safe_send = False

    def __init__(
        self, *, ping_interval: float | None = PING_INTERVAL, ping_timeout: float | None = PING_TIMEOUT
    ) -> None:
        super().__init__(library_logger, ping_interval=ping_interval, ping_timeout=ping_timeout)
        #: Set by the sandbox before connecting: where the connection's tasks run.
        self.nursery: trio.Nursery | None = None

    async def _open(self, url: str, options: dict[str, Any]) -> _Connection:
        assert self.nursery is not None
        ws = await _connect(url, create_connection=_Connection, **options).connect(self.nursery)
        assert isinstance(ws, _Connection)
        return ws

    async def close(self, code: int = 1000) -> None:
        if self._ws is not None:
            await self._ws.aclose(code)

    async def abort(self) -> None:
        if self._ws is not None:
            await trio.aclose_forcefully(self._ws.stream)
