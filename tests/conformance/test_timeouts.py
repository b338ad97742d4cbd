"""A service that accepts TCP and never answers: every transport gives up on time."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import trio
from _support import Client, silent_server

from sandbox_proto import SandboxConnectionError, SandboxTimeoutError

pytestmark = pytest.mark.anyio


async def test_create_gives_up_on_a_silent_server(client: Client) -> None:
    with silent_server() as url:
        started = anyio.current_time()
        with pytest.raises((SandboxTimeoutError, SandboxConnectionError)):
            await client.create(url, timeout=0.5)
        assert anyio.current_time() - started < 2


def _transport(name: str) -> Any:
    if name == "websockets":
        from sandbox_asyncio._websockets import WebsocketsTransport

        return WebsocketsTransport()
    if name == "aiohttp":
        from sandbox_asyncio._aiohttp import AiohttpTransport

        return AiohttpTransport()
    if name == "trio":
        from sandbox_trio._websockets import WebsocketsTransport as TrioWebsocketsTransport

        return TrioWebsocketsTransport()
    from sandbox_trio._trio_websocket import TrioWebsocketTransport

    return TrioWebsocketTransport()


async def test_the_transport_bounds_the_whole_handshake(transport: str) -> None:
    """``connect(timeout=)`` alone bounds it: a reconnect has no create() deadline around it."""
    connection = _transport(transport)
    with silent_server() as server:
        url = server.replace("http://", "ws://") + "/create"
        started = anyio.current_time()
        with anyio.fail_after(10):  # a guard, so that a failure does not hang the suite
            if transport.startswith("trio"):
                async with trio.open_nursery() as nursery:
                    connection.nursery = nursery
                    with pytest.raises(SandboxConnectionError, match=r"no WebSocket handshake within 0\.5s"):
                        await connection.connect(url, {}, ssl=None, timeout=0.5)
            else:
                with pytest.raises(SandboxConnectionError, match=r"no WebSocket handshake within 0\.5s"):
                    await connection.connect(url, {}, ssl=None, timeout=0.5)
        assert anyio.current_time() - started < 2
