"""trio-websocket's transport: one task per idle connection, and what that task still does."""

from __future__ import annotations

import pytest
import trio

from sandbox_trio import Sandbox

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def test_an_idle_sandbox_holds_one_task(url: str) -> None:
    async with trio.open_nursery() as nursery:
        sandbox = await Sandbox.create(url, nursery=nursery, transport="trio-websocket")
        await trio.sleep(0.05)  # whatever the opening left to do in the background
        # trio-websocket's reading task, run by ours: it also delivers and keeps alive.
        assert len(nursery.child_tasks) == 1
        process = await sandbox.exec("python", "print(6 * 7)")
        assert await process.stdout.read_all() == "42\n"
        await sandbox.kill()


async def test_a_short_ping_interval_keeps_a_live_connection(url: str) -> None:
    async with Sandbox.create(url, transport="trio-websocket", ping_interval=0.05, ping_timeout=1) as sandbox:
        await trio.sleep(0.3)  # several pings, each answered
        result = await sandbox.run("bash", "echo alive")
        assert result.stdout == "alive\n"
        assert sandbox.reconnects == 0
