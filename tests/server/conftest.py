"""Fixtures of the server tests: a fresh :class:`LocalServer` on a free port per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import pytest

from sandbox_server import LocalServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def local() -> AsyncIterator[LocalServer]:
    """Extended protocol."""
    async with LocalServer(port=0) as server:
        yield server


@pytest.fixture
async def plain_local() -> AsyncIterator[LocalServer]:
    """Extended protocol, plain processes: for tests that look at the exec's host pids and paths."""
    async with LocalServer(port=0, isolation="none") as server:
        yield server


@pytest.fixture(params=["extended", "upstream"])
async def any_local(request: pytest.FixtureRequest) -> AsyncIterator[LocalServer]:
    """Each protocol mode in turn."""
    async with LocalServer(port=0, protocol=request.param) as server:
        yield server


@pytest.fixture(params=["extended", "upstream"])
async def any_plain(request: pytest.FixtureRequest) -> AsyncIterator[LocalServer]:
    """Each protocol mode, without checkpoint or snapshot storage: the "plain" profile of section 12."""
    async with LocalServer(port=0, protocol=request.param, checkpoints=False, snapshots=False) as server:
        yield server


@pytest.fixture(params=["extended", "upstream"])
def protocol(request: pytest.FixtureRequest) -> Literal["extended", "upstream"]:
    """A protocol mode, for tests that start their own servers."""
    mode: Literal["extended", "upstream"] = request.param
    return mode
