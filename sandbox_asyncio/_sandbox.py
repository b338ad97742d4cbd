"""``Sandbox`` for asyncio: the shared driver, websockets or aiohttp, and asyncio tasks."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Literal, Unpack

from _sandbox_anyio import (
    PING_INTERVAL,
    PING_TIMEOUT,
    AttachOptions,
    BaseSandbox,
    CreateOptions,
    Transport,
    attach_protocol,
    create_protocol,
    open_timeout,
)
from _sandbox_anyio._extras import raise_for_missing_extra
from _sandbox_anyio._opening import OpeningBase

from ._runtime import ASYNCIO
from ._websockets import WebsocketsTransport

TransportName = Literal["websockets", "aiohttp"]


def _make_transport(transport: TransportName | Transport, session: Any, options: AttachOptions) -> Transport:
    if not isinstance(transport, str):
        if "ping_interval" in options or "ping_timeout" in options:
            raise ValueError("ping_interval= and ping_timeout= are for a named transport; configure your own directly")
        return transport
    ping_interval = options.get("ping_interval", PING_INTERVAL)
    ping_timeout = options.get("ping_timeout", PING_TIMEOUT)
    if transport == "websockets":
        if session is not None:
            raise ValueError("session= is for transport='aiohttp'")
        return WebsocketsTransport(ping_interval=ping_interval, ping_timeout=ping_timeout)
    if transport == "aiohttp":
        try:
            from ._aiohttp import AiohttpTransport  # optional dependency: the 'aiohttp' extra
        except ModuleNotFoundError as exc:
            raise_for_missing_extra(exc, "aiohttp", "transport='aiohttp'")
            raise

        return AiohttpTransport(session, ping_interval=ping_interval, ping_timeout=ping_timeout)
    raise ValueError(f"unknown transport {transport!r}: use 'websockets' or 'aiohttp'")


class _Opening(OpeningBase):
    """What ``Sandbox.create``/``attach`` return: awaitable, and an async context manager.

    ``sandbox = await Sandbox.create(url)`` and ``async with Sandbox.create(url) as sandbox``
    both work, as does the upstream ``async with await Sandbox.create(url)``. Used any
    other way (a forgotten ``await``, a plain ``with``) it says so where the mistake is,
    rather than failing later with an ``AttributeError`` about a class the user never named.
    """

    _opened_word = "awaited"

    def __init__(self, sandbox: Sandbox, timeout: float | None, call: str = "create") -> None:
        super().__init__(call)
        self._sandbox = sandbox
        self._timeout = timeout

    def _how_to_open(self) -> str:
        call = f"Sandbox.{self._call}"
        return f"{call}() must be awaited: `sb = await {call}(...)` or `async with {call}(...) as sb:`"

    def __await__(self) -> Generator[Any, None, Sandbox]:
        self._used = True
        loop = asyncio.get_running_loop()
        spawn_detached = functools.partial(_spawn_threadsafe, loop)
        return self._sandbox._open(self._sandbox._start_task, self._timeout, spawn_detached=spawn_detached).__await__()

    async def __aenter__(self) -> Sandbox:
        return await self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._sandbox.__aexit__(exc_type, exc, tb)


#: asyncio keeps only weak references to tasks: ours are held here until they end
#: (one set for every sandbox: a set per sandbox costs ~0.5 KiB each when idle).
_tasks: set[asyncio.Task[None]] = set()


def _spawn_threadsafe(loop: asyncio.AbstractEventLoop, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop.call_soon_threadsafe(_start_detached_task, loop, function)


def _start_detached_task(loop: asyncio.AbstractEventLoop, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
    task = loop.create_task(function())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


class Sandbox(BaseSandbox):
    """A sandbox of the Cloud Run Sandbox service, on asyncio.

    Make one with :meth:`create` or :meth:`attach`; the options are those of
    the README's table. Leaving ``async with`` kills the sandbox (as upstream);
    :meth:`close` detaches and leaves it running.
    """

    _runtime = ASYNCIO

    def _start_task(self, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(function(), name=f"sandbox-{self.sandbox_id}")
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    @classmethod
    def create(
        cls,
        url: str,
        *,
        transport: TransportName | Transport = "websockets",
        session: Any = None,
        **options: Unpack[CreateOptions],
    ) -> _Opening:
        """Create a sandbox. ``idle_timeout=None`` asks for no idle expiry.

        ``transport="aiohttp"`` uses aiohttp, with your ``session=`` if you give one.
        """
        sandbox = cls(url, create_protocol(url, options), _make_transport(transport, session, options), options)
        return _Opening(sandbox, open_timeout(options))

    @classmethod
    def attach(
        cls,
        url: str,
        sandbox_id: str,
        sandbox_token: str,
        *,
        transport: TransportName | Transport = "websockets",
        session: Any = None,
        **options: Unpack[AttachOptions],
    ) -> _Opening:
        """Attach to an existing sandbox (restoring it if it was checkpointed)."""
        protocol = attach_protocol(url, sandbox_id, sandbox_token, options)
        return _Opening(
            cls(url, protocol, _make_transport(transport, session, options), options), open_timeout(options), "attach"
        )
