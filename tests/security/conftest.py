"""A server with isolation on and small limits, so that each attack is contained quickly."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import ServerThread
from security._limits import LIMITS


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sandbox-security-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def isolated(state_dir: Path) -> Iterator[ServerThread]:
    """The server every attack runs against: bwrap, small limits, a known state directory."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap (CI installs it)")
    with ServerThread(isolation="bwrap", limits=LIMITS, state_dir=state_dir) as running:
        yield running
