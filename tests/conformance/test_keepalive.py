"""Keepalive: a peer that goes silent without closing (a black hole) is declared dead in time."""

from __future__ import annotations

import anyio
import pytest
from _support import Client, CuttingProxy, ServerThread, wait_until

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


async def test_a_paused_reader_is_not_declared_dead(client: Client, server: ServerThread) -> None:
    # ~2 MiB at once: far more than the 64 KiB buffers, so reading pauses with pongs queued behind it.
    lines = 2048
    program = (
        "import sys, time\n"
        f"for i in range({lines}): sys.stdout.write(f'{{i:08d}} ' + 'x' * 1014 + '\\n')\n"
        "sys.stdout.flush()\n"
        "time.sleep(1.5)\n"
        "print('end')"
    )
    # With auto-reconnect, as users run it: a false verdict shows as a reconnect (and lost output upstream).
    async with client.create(
        server.url, ping_interval=0.2, ping_timeout=0.2, stream_buffer_size=64 * 1024, enable_auto_reconnect=True
    ) as sandbox:
        process = await sandbox.exec("python", program)
        await wait_until(lambda: sandbox._reading_paused, 30, "reading to pause")
        # Not a synchronisation: an idle reader is the scenario. 1.5 s is several ping cycles
        # (0.4 s each), any of which would have declared the connection dead.
        await anyio.sleep(1.5)
        assert sandbox.state == "running"
        out = await process.stdout.read_all(timeout=60)
        returncode = await process.wait()
        assert sandbox.reconnects == 0
        assert sandbox.state == "running"
    assert returncode == (None if server.protocol == "upstream" else 0)  # type: ignore[attr-defined]
    assert out == "".join(f"{i:08d} " + "x" * 1014 + "\n" for i in range(lines)) + "end\n"


async def test_keepalive_resumes_with_reading(client: Client, server: ServerThread) -> None:
    with CuttingProxy(server.url) as proxy:
        sandbox = await client.create(
            proxy.url,
            ping_interval=0.3,
            ping_timeout=0.3,
            stream_buffer_size=64 * 1024,
            enable_auto_reconnect=False,
        )
        try:
            process = await sandbox.exec("python", "import sys\nsys.stdout.write('x' * 2**20)")
            await wait_until(lambda: sandbox._reading_paused, 30, "reading to pause")
            assert len(await process.stdout.read_all(timeout=60)) == 2**20
            await process.wait()
            assert not sandbox._reading_paused
            # Reading resumed: a black hole must be noticed again, as if there had been no pause.
            proxy.freeze()
            frozen = anyio.current_time()
            assert isinstance(await sandbox.wait_closed(timeout=10), SandboxConnectionError)
            assert anyio.current_time() - frozen < 3
        finally:
            await sandbox.kill()
