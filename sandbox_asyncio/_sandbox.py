"""``Sandbox`` for asyncio: the shared driver, websockets or aiohttp, and asyncio tasks."""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Literal

from _sandbox_anyio import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STREAM_BUFFER,
    BaseSandbox,
    TokenProvider,
    Transport,
    attach_protocol,
    create_protocol,
)
from sandbox_proto import ClientProtocol, ReconnectPolicy

from ._websockets import WebsocketsTransport

TransportName = Literal["websockets", "aiohttp"]


def _make_transport(transport: TransportName | Transport, session: Any) -> Transport:
    if not isinstance(transport, str):
        return transport
    if transport == "websockets":
        if session is not None:
            raise ValueError("session= is for transport='aiohttp'")
        return WebsocketsTransport()
    if transport == "aiohttp":
        from ._aiohttp import AiohttpTransport  # optional dependency: the 'aiohttp' extra

        return AiohttpTransport(session)
    raise ValueError(f"unknown transport {transport!r}: use 'websockets' or 'aiohttp'")


class _Opening:
    """What ``Sandbox.create``/``attach`` return: awaitable, and an async context manager.

    ``sandbox = await Sandbox.create(url)`` and ``async with Sandbox.create(url) as sandbox``
    both work, as does the upstream ``async with await Sandbox.create(url)``.
    """

    def __init__(self, sandbox: Sandbox, timeout: float | None) -> None:
        self._sandbox = sandbox
        self._timeout = timeout

    def __await__(self) -> Generator[Any, None, Sandbox]:
        return self._sandbox._open(self._sandbox._start_task, self._timeout).__await__()

    async def __aenter__(self) -> Sandbox:
        return await self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._sandbox.__aexit__(exc_type, exc, tb)


class Sandbox(BaseSandbox):
    """A sandbox of the Cloud Run Sandbox service, on asyncio.

    Make one with :meth:`create` or :meth:`attach`. Leaving ``async with``
    kills the sandbox (as upstream); :meth:`close` detaches and leaves it running.
    """

    def __init__(
        self,
        protocol: ClientProtocol,
        *,
        ssl: ssl_module.SSLContext | None,
        transport: Transport,
        stream_buffer_size: int,
        token_provider: TokenProvider | None = None,
        use_google_auth: bool = False,
        url: str = "",
    ) -> None:
        super().__init__(
            protocol,
            ssl=ssl,
            transport=transport,
            stream_buffer_size=stream_buffer_size,
            token_provider=token_provider,
            use_google_auth=use_google_auth,
            url=url,
        )
        # asyncio keeps only weak references to tasks: hold ours until they end.
        self._tasks: set[asyncio.Task[None]] = set()

    def _start_task(self, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(function(), name=f"sandbox-reader-{self.sandbox_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @classmethod
    def create(
        cls,
        url: str,
        *,
        idle_timeout: float | None = 60,
        enable_sandbox_checkpoint: bool = False,
        enable_idle_timeout_auto_checkpoint: bool = False,
        enable_sandbox_handoff: bool = False,
        filesystem_snapshot_name: str | None = None,
        enable_debug: bool = False,
        debug_label: str = "",
        ssl: ssl_module.SSLContext | None = None,
        enable_auto_reconnect: bool = False,
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        headers: dict[str, str] | None = None,
        transport: TransportName | Transport = "websockets",
        session: Any = None,
        reconnect_policy: ReconnectPolicy | None = None,
        stream_buffer_size: int = DEFAULT_STREAM_BUFFER,
        token_provider: TokenProvider | None = None,
        use_google_auth: bool = False,
    ) -> _Opening:
        """Create a sandbox. ``idle_timeout=None`` asks for no idle expiry."""
        protocol = create_protocol(
            url,
            idle_timeout=idle_timeout,
            enable_sandbox_checkpoint=enable_sandbox_checkpoint,
            enable_idle_timeout_auto_checkpoint=enable_idle_timeout_auto_checkpoint,
            enable_sandbox_handoff=enable_sandbox_handoff,
            filesystem_snapshot_name=filesystem_snapshot_name,
            enable_debug=enable_debug,
            debug_label=debug_label,
            enable_auto_reconnect=enable_auto_reconnect,
            headers=headers,
            reconnect_policy=reconnect_policy,
        )
        sandbox = cls(
            protocol,
            ssl=ssl,
            transport=_make_transport(transport, session),
            stream_buffer_size=stream_buffer_size,
            token_provider=token_provider,
            use_google_auth=use_google_auth,
            url=url,
        )
        return _Opening(sandbox, timeout)

    @classmethod
    def attach(
        cls,
        url: str,
        sandbox_id: str,
        sandbox_token: str,
        *,
        enable_debug: bool = False,
        debug_label: str = "",
        ssl: ssl_module.SSLContext | None = None,
        enable_auto_reconnect: bool = False,
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        headers: dict[str, str] | None = None,
        transport: TransportName | Transport = "websockets",
        session: Any = None,
        reconnect_policy: ReconnectPolicy | None = None,
        stream_buffer_size: int = DEFAULT_STREAM_BUFFER,
        token_provider: TokenProvider | None = None,
        use_google_auth: bool = False,
    ) -> _Opening:
        """Attach to an existing sandbox (restoring it if it was checkpointed)."""
        protocol = attach_protocol(
            url,
            sandbox_id,
            sandbox_token,
            enable_debug=enable_debug,
            debug_label=debug_label,
            enable_auto_reconnect=enable_auto_reconnect,
            headers=headers,
            reconnect_policy=reconnect_policy,
        )
        sandbox = cls(
            protocol,
            ssl=ssl,
            transport=_make_transport(transport, session),
            stream_buffer_size=stream_buffer_size,
            token_provider=token_provider,
            use_google_auth=use_google_auth,
            url=url,
        )
        return _Opening(sandbox, timeout)
