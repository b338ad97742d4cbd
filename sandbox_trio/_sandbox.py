"""``Sandbox`` for trio: the shared driver, websockets (or trio-websocket), and a nursery.

The one difference from asyncio: the connection's tasks must live in a nursery.
``async with Sandbox.create(url) as sandbox`` opens one for the block; a
sandbox that outlives a block takes the caller's: ``await Sandbox.create(url, nursery=n)``.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Unpack

import trio

from _sandbox_anyio import (
    AttachOptions,
    BaseSandbox,
    CreateOptions,
    attach_protocol,
    create_protocol,
    open_timeout,
)
from sandbox_proto import SandboxStateError

from ._websockets import WebsocketsTransport

if TYPE_CHECKING:
    from ._trio_websocket import TrioWebsocketTransport

TransportName = Literal["websockets", "trio-websocket"]


def _make_transport(transport: TransportName) -> WebsocketsTransport | TrioWebsocketTransport:
    if transport == "websockets":
        return WebsocketsTransport()
    if transport == "trio-websocket":
        from ._trio_websocket import TrioWebsocketTransport  # needed only by those who ask for it

        return TrioWebsocketTransport()
    raise ValueError(f"unknown transport {transport!r}: use 'websockets' or 'trio-websocket'")


class _Opening:
    """What ``Sandbox.create``/``attach`` return on trio.

    ``async with`` opens a nursery for the sandbox's tasks and kills the sandbox
    at the end; ``await`` needs ``nursery=`` (the sandbox then lives as long as it).
    """

    def __init__(self, sandbox: Sandbox, timeout: float | None, nursery: trio.Nursery | None) -> None:
        self._sandbox = sandbox
        self._timeout = timeout
        self._nursery = nursery
        self._own_nursery: AbstractAsyncContextManager[trio.Nursery] | None = None

    def __await__(self) -> Generator[Any, None, Sandbox]:
        if self._nursery is None:
            raise SandboxStateError(
                "on trio, use `async with Sandbox.create(...)`, or pass nursery= to keep the sandbox beyond a block"
            )
        return self._sandbox._open_in(self._nursery, self._timeout).__await__()

    async def __aenter__(self) -> Sandbox:
        if self._nursery is not None:
            return await self._sandbox._open_in(self._nursery, self._timeout)
        self._own_nursery = trio.open_nursery()
        nursery = await self._own_nursery.__aenter__()
        try:
            return await self._sandbox._open_in(nursery, self._timeout)
        except BaseException:
            # Close the nursery without handing it our error, so the caller gets the
            # error itself rather than an exception group around it.
            nursery.cancel_scope.cancel()
            await self._own_nursery.__aexit__(None, None, None)
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._own_nursery is None:
            await self._sandbox.__aexit__(exc_type, exc, tb)
            return None
        try:
            await self._sandbox.__aexit__(exc_type, exc, tb)
        except BaseException as error:
            await self._own_nursery.__aexit__(type(error), error, error.__traceback__)
            raise
        return await self._own_nursery.__aexit__(exc_type, exc, tb)


class Sandbox(BaseSandbox):
    """A sandbox of the Cloud Run Sandbox service, on trio.

    Same calls, options, return types and exceptions as ``sandbox_asyncio.Sandbox``,
    plus ``nursery=`` for a sandbox that outlives one ``async with`` block.
    ``transport="trio-websocket"`` uses trio-websocket instead of websockets.
    """

    _transport: WebsocketsTransport | TrioWebsocketTransport

    async def _open_in(self, nursery: trio.Nursery, timeout: float | None) -> Sandbox:
        self._transport.nursery = nursery
        return await self._open(nursery.start_soon, trio.current_time, timeout)

    @classmethod
    def create(
        cls,
        url: str,
        *,
        nursery: trio.Nursery | None = None,
        transport: TransportName = "websockets",
        **options: Unpack[CreateOptions],
    ) -> _Opening:
        """Create a sandbox. ``idle_timeout=None`` asks for no idle expiry."""
        sandbox = cls(url, create_protocol(url, options), _make_transport(transport), options)
        return _Opening(sandbox, open_timeout(options), nursery)

    @classmethod
    def attach(
        cls,
        url: str,
        sandbox_id: str,
        sandbox_token: str,
        *,
        nursery: trio.Nursery | None = None,
        transport: TransportName = "websockets",
        **options: Unpack[AttachOptions],
    ) -> _Opening:
        """Attach to an existing sandbox (restoring it if it was checkpointed)."""
        protocol = attach_protocol(url, sandbox_id, sandbox_token, options)
        sandbox = cls(url, protocol, _make_transport(transport), options)
        return _Opening(sandbox, open_timeout(options), nursery)
