"""The default asyncio transport, on ``websockets``' asyncio API.

Messages go from websockets' parser to the driver inside ``data_received``
(see ``_sandbox_anyio._handoff``): no queue, no reader task. Keepalive is
websockets' own, except that an unanswered ping drops the connection at once,
and that it holds its verdict while the driver pauses reading (back-pressure).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame
from websockets.protocol import Event, State

from _sandbox_anyio import PING_INTERVAL, PING_TIMEOUT, Handoff, WebsocketsTransportBase
from _sandbox_anyio._transport import ReadingGate
from sandbox_proto import RedactingFilter

from ._runtime import ASYNCIO

#: Handed to websockets, whose debug log shows request lines and frames with the token.
library_logger = logging.getLogger("sandbox_asyncio.websockets")
library_logger.addFilter(RedactingFilter())


class _Connection(ClientConnection):
    """websockets' connection, handing messages over as they are parsed instead of queueing them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handoff = Handoff(self.protocol)
        self.reading = ReadingGate(ASYNCIO)

    def process_event(self, event: Event) -> None:
        if self.response is None or not isinstance(event, Frame) or not self.handoff.take(event):
            super().process_event(event)
        elif self.handoff.failed:
            self.send_data()  # the close frame, then hang up
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.handoff.lost(self.protocol.close_exc)

    def pause_reading(self) -> None:
        self.reading.pause()
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()
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
        latency = 0.0
        try:
            while True:
                mark = await self.reading.wait_reading()
                # A pong later than the interval (but in time) delays the next ping, as in websockets.
                await asyncio.sleep(max(self.ping_interval - latency, 0))
                latency = 0.0
                if self.reading.paused_since(mark):
                    continue  # its pong could not be read before reading resumes
                if self.ping_timeout is None:
                    await self.ping()
                    continue
                try:
                    async with asyncio.timeout(self.ping_timeout):
                        pong_received = await self.ping()
                        latency = await pong_received
                except TimeoutError:
                    if self.reading.paused_since(mark):
                        continue  # the pong may be waiting unread behind the held output
                    if self.debug:
                        self.logger.debug("- timed out waiting for keepalive pong")
                    if self.protocol.state is State.OPEN:
                        self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                        self.send_data()  # the close frame, for a peer that is slow rather than gone
                    self.transport.abort()  # connection_lost follows: 1011 reaches the driver
                    return
        except ConnectionClosed:
            return
        except Exception:
            self.logger.error("keepalive ping failed", exc_info=True)


class WebsocketsTransport(WebsocketsTransportBase):
    _ws: _Connection | None
    #: send() writes the whole frame to asyncio's transport before its first await (drain).
    cancel_safe_send = True

    def __init__(
        self, *, ping_interval: float | None = PING_INTERVAL, ping_timeout: float | None = PING_TIMEOUT
    ) -> None:
        super().__init__(library_logger, ping_interval=ping_interval, ping_timeout=ping_timeout)

    async def _open(self, url: str, options: dict[str, Any]) -> _Connection:
        ws = await connect(url, create_connection=_Connection, **options)
        assert isinstance(ws, _Connection)
        return ws

    async def close(self, code: int = 1000) -> None:
        if self._ws is not None:
            await self._ws.close(code)

    async def abort(self) -> None:
        if self._ws is not None:
            self._ws.transport.abort()
