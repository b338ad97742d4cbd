"""The aiohttp transport with a session the application already holds."""

from __future__ import annotations

import aiohttp
import pytest

from sandbox_asyncio import Sandbox

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
