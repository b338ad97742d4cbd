"""The aiohttp transport with a session the application already holds."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest
from _support import CuttingProxy, ServerThread

from sandbox_asyncio import Sandbox
from sandbox_asyncio._aiohttp import _shared_sessions

pytestmark = pytest.mark.anyio


async def test_callers_session_is_used_and_left_open(url: str) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with Sandbox.create(url, transport="aiohttp", session=session) as sandbox:
            process = await sandbox.exec("python", "print('via aiohttp')")
            assert await process.stdout.read_all() == "via aiohttp\n"
        assert not session.closed
        # The server's affinity cookie went into the caller's jar.
        assert "SANDBOX_AFFINITY" in {cookie.key for cookie in session.cookie_jar}


async def test_session_with_websockets_transport_is_refused(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError, match="aiohttp"):
            Sandbox.create(url, session=session)


@contextmanager
def no_unclosed_aiohttp_objects() -> Iterator[None]:
    """Fail if aiohttp (or asyncio under it) warns of anything left open, once garbage is collected."""
    loop = asyncio.get_running_loop()
    debug = loop.get_debug()
    loop.set_debug(True)  # aiohttp reports an unclosed response only in debug mode
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            yield
            gc.collect()
    finally:
        loop.set_debug(debug)
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    # aiohttp's "Unclosed client session/connector/connection/response", asyncio's "unclosed transport".
    assert not [m for m in leaks if m.startswith(("Unclosed", "unclosed transport"))], leaks


@pytest.mark.parametrize("own_session", [True, False])
async def test_kill_returns_once_the_socket_and_our_session_are_closed(url: str, own_session: bool) -> None:
    async with aiohttp.ClientSession() as callers:
        with no_unclosed_aiohttp_objects():
            sandbox = await Sandbox.create(url, transport="aiohttp", session=None if own_session else callers)
            socket = sandbox._transport._ws.get_extra_info("socket")
            process = await sandbox.exec("bash", "echo hi")
            assert await process.stdout.read_all() == "hi\n"
            await sandbox.kill()
            assert socket.fileno() == -1  # closed already, not on a later turn of the loop
            assert asyncio.get_running_loop() not in _shared_sessions
            del sandbox, process


async def test_a_lost_connection_leaves_nothing_unclosed(server: ServerThread) -> None:
    async with aiohttp.ClientSession() as callers:
        with no_unclosed_aiohttp_objects(), CuttingProxy(server.url) as proxy:
            sandbox = await Sandbox.create(proxy.url, transport="aiohttp", session=callers)
            socket = sandbox._transport._ws.get_extra_info("socket")
            proxy.cut()
            assert await sandbox.wait_closed(timeout=10) is not None
            await sandbox.kill()
            assert socket.fileno() == -1
            del sandbox
