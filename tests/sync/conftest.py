from __future__ import annotations

from collections.abc import Iterator

import pytest
from _support import ServerThread


@pytest.fixture(scope="module")
def local_url() -> Iterator[str]:
    """One local server (extended protocol) for a module of sync tests, on its own thread."""
    with ServerThread() as server:
        yield server.url
