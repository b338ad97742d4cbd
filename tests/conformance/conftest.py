"""One suite, every transport: websockets and aiohttp on asyncio, websockets and trio-websocket on trio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
from _support import Client

#: "trio" is trio's default transport (websockets).
TRANSPORTS = ["websockets", "aiohttp", "trio", "trio-websocket"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend(transport: str) -> str:
    return "trio" if transport.startswith("trio") else "asyncio"


@pytest.fixture
async def client(transport: str) -> AsyncIterator[Client]:
    if not transport.startswith("trio"):
        yield Client(transport)
        return
    # On trio a sandbox that outlives one block lives in a nursery: the test's.
    async with trio.open_nursery() as nursery:
        yield Client(transport, nursery)
        nursery.cancel_scope.cancel()
