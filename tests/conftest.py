from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from _support import ServerThread

PROTOCOLS = ["extended", "upstream"]


@pytest.fixture(scope="session", params=PROTOCOLS)
def server(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The local reference server, once per protocol mode for the whole session."""
    from _support import ServerThread  # imported late: the unit tests need no server

    with ServerThread(protocol=request.param) as running:
        running.protocol = request.param  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def url(server: ServerThread) -> str:
    return server.url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
