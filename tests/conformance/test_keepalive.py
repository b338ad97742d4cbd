"""Keepalive: a peer that goes silent without closing (a black hole) is declared dead in time."""

from __future__ import annotations

import anyio
import pytest
from _support import Client, CuttingProxy, ServerThread

from sandbox_proto import SandboxConnectionError

pytestmark = pytest.mark.anyio


async def test_a_black_hole_is_noticed_within_interval_plus_timeout(client: Client, server: ServerThread) -> None:
    with CuttingProxy(server.url) as proxy:
        sandbox = await client.create(proxy.url, ping_interval=0.3, ping_timeout=0.3, enable_auto_reconnect=False)
        try:
            proxy.freeze()
            frozen = anyio.current_time()
            assert isinstance(await sandbox.wait_closed(timeout=10), SandboxConnectionError)
            # 0.6 s of keepalive, with room for a slow machine; not also a closing handshake's 5 s.
            assert anyio.current_time() - frozen < 3
        finally:
            await sandbox.kill()


async def test_no_ping_interval_sends_no_ping(client: Client, server: ServerThread) -> None:
    with CuttingProxy(server.url) as proxy:
        sandbox = await client.create(proxy.url, ping_interval=None, ping_timeout=0.3, enable_auto_reconnect=False)
        try:
            proxy.freeze()
            # A ping would go unanswered and end the session; none is sent, so it stays up.
            deadline = anyio.current_time() + 1.5
            while anyio.current_time() < deadline:
                assert sandbox.state == "running"
                await anyio.sleep(0.05)
        finally:
            proxy.unfreeze()
            await sandbox.kill()
