"""The aiohttp transport hands messages over from aiohttp's parser: no reader task."""

from __future__ import annotations

import asyncio

import pytest

from sandbox_asyncio import Sandbox
from sandbox_asyncio._aiohttp import AiohttpTransport
from sandbox_asyncio._aiohttp_handoff import Handoff

pytestmark = pytest.mark.anyio


async def _settled_tasks() -> int:
    await asyncio.sleep(0.2)  # the driver's flushes after an exec are over
    return len(asyncio.all_tasks())


async def test_idle_sandboxes_hold_no_task(url: str) -> None:
    before = await _settled_tasks()
    sandboxes = [await Sandbox.create(url, transport="aiohttp") for _ in range(3)]
    try:
        for sandbox in sandboxes:
            process = await sandbox.exec("bash", "echo hi")
            assert await process.stdout.read_all() == "hi\n"
            transport = sandbox._transport
            assert isinstance(transport, AiohttpTransport)
            assert transport._handler is not None
            assert isinstance(transport._handler._payload_parser, Handoff)
        assert await _settled_tasks() == before
    finally:
        for sandbox in sandboxes:
            await sandbox.close()
