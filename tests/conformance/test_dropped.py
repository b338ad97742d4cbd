"""A sandbox object dropped without close() or kill() lets go of its sandbox."""

from __future__ import annotations

import gc

import anyio
import pytest
import trio
from _support import Client, ServerThread

from sandbox_proto import SandboxCreationError, Status

pytestmark = pytest.mark.anyio


async def _attach_when_free(client: Client, url: str, sandbox_id: str, token: str) -> None:
    """Attach as soon as nobody holds the sandbox (``SANDBOX_IN_USE`` until then), then kill it."""
    deadline = anyio.current_time() + 10
    while True:
        try:
            other = await client.attach(url, sandbox_id, token)
        except SandboxCreationError as exc:
            if exc.status is not Status.SANDBOX_IN_USE or anyio.current_time() > deadline:
                raise
            gc.collect()
            await anyio.sleep(0.05)
            continue
        await other.kill()
        return


async def test_a_dropped_sandbox_is_collected_and_detached(client: Client, server: ServerThread) -> None:
    with anyio.fail_after(30):
        sandbox = await client.create(server.url)
        sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
        await (await sandbox.exec("bash", "true")).wait()
        del sandbox
        gc.collect()
        await _attach_when_free(client, server.url, sandbox_id, token)


@pytest.mark.parametrize("transport", ["trio", "trio-websocket"])
async def test_a_nursery_holding_a_forgotten_sandbox_exits(transport: str, server: ServerThread) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            sandbox = await Client(transport, nursery).create(server.url)
            sandbox_id, token = sandbox.sandbox_id, sandbox.sandbox_token
            del sandbox
            gc.collect()
        # The block ended: the forgotten sandbox's tasks did not hold the nursery open.
        async with trio.open_nursery() as nursery:
            await _attach_when_free(Client(transport, nursery), server.url, sandbox_id, token)
