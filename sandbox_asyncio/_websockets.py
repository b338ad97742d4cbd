"""The default asyncio transport, on ``websockets``' asyncio API.

Messages go from websockets' parser to the driver inside ``data_received``
(see ``_sandbox_anyio._handoff``): no queue, no reader task.
"""

from __future__ import annotations

import logging
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame
from websockets.protocol import Event

from _sandbox_anyio import Handoff, WebsocketsTransportBase
from sandbox_proto import RedactingFilter

#: Handed to websockets, whose debug log shows request lines and frames with the token.
library_logger = logging.getLogger("sandbox_asyncio.websockets")
library_logger.addFilter(RedactingFilter())


class _Connection(ClientConnection):
    """websockets' connection, handing messages over as they are parsed instead of queueing them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handoff = Handoff(self.protocol)

    def process_event(self, event: Event) -> None:
        if self.response is None or not isinstance(event, Frame) or not self.handoff.take(event):
            super().process_event(event)
        elif self.handoff.failed:
            self.send_data()  # the close frame, then hang up
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.handoff.lost(self.protocol.close_exc)


class WebsocketsTransport(WebsocketsTransportBase):
    _ws: _Connection | None

    def __init__(self) -> None:
        super().__init__(library_logger)

    async def _open(self, url: str, options: dict[str, Any]) -> _Connection:
        ws = await connect(url, create_connection=_Connection, **options)
        assert isinstance(ws, _Connection)
        return ws

    def pause_reading(self) -> None:
        assert self._ws is not None
        self._ws.transport.pause_reading()

    def resume_reading(self) -> None:
        assert self._ws is not None
        self._ws.transport.resume_reading()

    async def close(self, code: int = 1000) -> None:
        if self._ws is not None:
            await self._ws.close(code)

    async def abort(self) -> None:
        if self._ws is not None:
            self._ws.transport.abort()
