"""``Sandbox`` for trio: the shared driver, websockets (or trio-websocket), and a nursery.

The one difference from asyncio: the connection's tasks must live in a nursery.
``async with Sandbox.create(url) as sandbox`` opens one for the block; a
sandbox that outlives a block takes the caller's: ``await Sandbox.create(url, nursery=n)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Generator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Unpack

from _sandbox_anyio._extras import raise_for_missing_extra
from _sandbox_anyio._opening import OpeningBase

try:
    import trio
except ModuleNotFoundError as exc:  # the first import of trio when sandbox_trio is imported
    raise_for_missing_extra(exc, "trio", "sandbox_trio")
    raise

from _sandbox_anyio import (
    PING_INTERVAL,
    PING_TIMEOUT,
    AttachOptions,
    BaseSandbox,
    CreateOptions,
    attach_protocol,
    create_protocol,
    open_timeout,
)
from sandbox_proto import SandboxStateError

from ._runtime import TRIO
from ._websockets import WebsocketsTransport

if TYPE_CHECKING:
    from ._trio_websocket import TrioWebsocketTransport

logger = logging.getLogger("sandbox")

TransportName = Literal["websockets", "trio-websocket"]


def _make_transport(transport: TransportName, options: AttachOptions) -> WebsocketsTransport | TrioWebsocketTransport:
    ping_interval = options.get("ping_interval", PING_INTERVAL)
    ping_timeout = options.get("ping_timeout", PING_TIMEOUT)
    if transport == "websockets":
        return WebsocketsTransport(ping_interval=ping_interval, ping_timeout=ping_timeout)
    if transport == "trio-websocket":
        try:
            from ._trio_websocket import TrioWebsocketTransport  # needed only by those who ask for it
        except ModuleNotFoundError as exc:
            raise_for_missing_extra(exc, "trio", "transport='trio-websocket'")
            raise

        return TrioWebsocketTransport(ping_interval=ping_interval, ping_timeout=ping_timeout)
    raise ValueError(f"unknown transport {transport!r}: use 'websockets' or 'trio-websocket'")


def _spawn_threadsafe(
    token: trio.lowlevel.TrioToken, nursery: trio.Nursery, function: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    def start() -> None:
        with contextlib.suppress(RuntimeError):  # the nursery is closed: its tasks are over already
            nursery.start_soon(function)

    token.run_sync_soon(start)


class _Opening(OpeningBase):
    """What ``Sandbox.create``/``attach`` return on trio.

    ``async with`` opens a nursery for the sandbox's tasks and kills the sandbox
    at the end; ``await`` needs ``nursery=`` (the sandbox then lives as long as it).
    Used any other way (a forgotten ``async with``, a plain ``with``) it says so where the
    mistake is.
    """

    def __init__(
        self, sandbox: Sandbox, timeout: float | None, nursery: trio.Nursery | None, call: str = "create"
    ) -> None:
        super().__init__(call)
        self._sandbox = sandbox
        self._timeout = timeout
        self._nursery = nursery
        self._own_nursery: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._own_scope: trio.CancelScope | None = None

    def _how_to_open(self) -> str:
        call = f"Sandbox.{self._call}"
        return f"{call}() must be opened: `async with {call}(...) as sb:`, or `sb = await {call}(..., nursery=nursery)`"

    def __await__(self) -> Generator[Any, None, Sandbox]:
        self._used = True
        if self._nursery is None:
            raise SandboxStateError(
                "on trio, use `async with Sandbox.create(...)`, or pass nursery= to keep the sandbox beyond a block"
            )
        return self._sandbox._open_in(self._nursery, self._timeout).__await__()

    async def __aenter__(self) -> Sandbox:
        self._used = True
        if self._nursery is not None:
            return await self._sandbox._open_in(self._nursery, self._timeout)
        self._own_nursery = trio.open_nursery()
        nursery = await self._own_nursery.__aenter__()
        self._own_scope = nursery.cancel_scope
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
        own, self._own_nursery = self._own_nursery, None
        if own is None:
            await self._sandbox.__aexit__(exc_type, exc, tb)
            return None
        assert self._own_scope is not None
        error = exc
        try:
            await self._sandbox.__aexit__(exc_type, exc, tb)  # kills the sandbox
        except BaseException as failure:
            if exc is None or _is_cancellation(exc):
                error = failure
            elif not _is_cancellation(failure):
                # The block's own error is the one the caller needs; this one is only logged.
                logger.error("killing the sandbox failed as well", exc_info=failure)
        # Nothing to hand on, or a cancellation, which may be the nursery's own (one of its tasks
        # failed): trio's rules apply, the nursery absorbs it or reports the failure.
        if error is exc and (exc is None or _is_cancellation(exc)):
            return await own.__aexit__(exc_type, exc, tb)
        assert error is not None
        if _is_cancellation(error):  # the kill was cancelled
            if not await own.__aexit__(type(error), error, error.__traceback__):
                raise error
            return None
        # The caller gets the error itself, as on asyncio, not an exception group around it: the
        # nursery is closed without it (cancelled: its tasks end with the killed sandbox anyway).
        self._own_scope.cancel()
        try:
            await own.__aexit__(None, None, None)
        except BaseException as background:
            # Rare (the sandbox's tasks catch their errors): logged, so the caller's error stays as it was.
            logger.error("the sandbox's background work failed as well", exc_info=background)
        if error is exc:
            return False  # the block's own exception goes on, traceback untouched
        raise error


def _is_cancellation(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[0] is not None
    return isinstance(error, trio.Cancelled)


class Sandbox(BaseSandbox):
    """A sandbox of the Cloud Run Sandbox service, on trio.

    Same calls, options, return types and exceptions as ``sandbox_asyncio.Sandbox``,
    plus ``nursery=`` for a sandbox that outlives one ``async with`` block.
    ``transport="trio-websocket"`` uses trio-websocket instead of websockets.
    """

    _transport: WebsocketsTransport | TrioWebsocketTransport
    _runtime = TRIO

    async def _open_in(self, nursery: trio.Nursery, timeout: float | None) -> Sandbox:
        self._transport.nursery = nursery
        token = trio.lowlevel.current_trio_token()
        spawn_detached = functools.partial(_spawn_threadsafe, token, nursery)
        return await self._open(nursery.start_soon, timeout, spawn_detached=spawn_detached)

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
        sandbox = cls(url, create_protocol(url, options), _make_transport(transport, options), options)
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
        sandbox = cls(url, protocol, _make_transport(transport, options), options)
        return _Opening(sandbox, open_timeout(options), nursery, "attach")
