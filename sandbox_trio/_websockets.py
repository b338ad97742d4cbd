"""The default trio transport, on ``websockets``' trio API.

As on asyncio, messages go from websockets' parser to the driver inside the
connection's own reading task (see ``_sandbox_anyio._handoff``). The
connection's tasks (reading, keepalive) run in the sandbox's nursery;
websockets catches and logs their errors, so none reaches the nursery.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from websockets.frames import Frame
from websockets.protocol import Event
from websockets.trio.client import ClientConnection, connect

from _sandbox_anyio import CLOSE_TIMEOUT, Handoff, WebsocketsTransportBase
from sandbox_proto import RedactingFilter

#: Handed to websockets, whose debug log shows request lines and frames with the token.
library_logger = logging.getLogger("sandbox_trio.websockets")
library_logger.addFilter(RedactingFilter())


class _Connection(ClientConnection):
    """websockets' connection, handing messages over as they are parsed instead of queueing them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # its reading task starts later, at a checkpoint
        self.handoff = Handoff(self.protocol)

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
        self.handoff.lost(self.protocol.close_exc)


class WebsocketsTransport(WebsocketsTransportBase):
    _ws: _Connection | None
    connect_errors = (trio.BrokenResourceError,)

    def __init__(self) -> None:
        super().__init__(library_logger)
        #: Set by the sandbox before connecting: where the connection's tasks run.
        self.nursery: trio.Nursery | None = None

    async def _open(self, url: str, options: dict[str, Any]) -> _Connection:
        assert self.nursery is not None
        ws = await connect(url, create_connection=_Connection, **options).connect(self.nursery)
        assert isinstance(ws, _Connection)
        return ws

    def pause_reading(self) -> None:
        assert self._ws is not None
        self._ws.pause_reading()

    def resume_reading(self) -> None:
        assert self._ws is not None
        self._ws.resume_reading()

    async def close(self, code: int = 1000) -> None:
        if self._ws is not None:
            await self._ws.aclose(code)

    async def abort(self) -> None:
        if self._ws is not None:
            await trio.aclose_forcefully(self._ws.stream)
