"""pytest plugin: a real local sandbox server, and open sandboxes, for your own tests.

Installing the package registers this plugin (entry point ``sandbox`` in the
``pytest11`` group), so these fixtures are available with no configuration:

``sandbox_server_url`` (session)
    The URL of a :class:`sandbox_server.LocalServer` started once per test
    session on a free loopback port, in a background thread with its own event
    loop (so a test that blocks its loop, or runs on trio, cannot stall it).
    With ``--sandbox-url URL`` the tests use that service instead.

``sandbox``
    An open ``sandbox_asyncio.Sandbox`` on that server, killed after the test.

``trio_sandbox``
    The same with ``sandbox_trio.Sandbox`` (needs the ``trio`` extra).

The sandbox fixtures are async: mark the test with ``@pytest.mark.anyio``
(anyio's pytest plugin runs it). A test that uses ``sandbox`` runs on asyncio
only and one that uses ``trio_sandbox`` on trio only, whatever
``anyio_backend`` would otherwise choose::

    import pytest

    @pytest.mark.anyio
    async def test_my_code(sandbox):
        process = await sandbox.exec("python", "print(6 * 7)")
        assert await process.stdout.read_all() == "42\\n"

Override ``sandbox_server_options`` (a session fixture returning keyword
arguments of ``LocalServer``) to run the server differently, e.g.
``{"protocol": "upstream"}`` to test code against the upstream protocol only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import sandbox_trio
    from sandbox_asyncio import Sandbox
    from sandbox_server import LocalServer

__all__ = ["sandbox", "sandbox_server_options", "sandbox_server_url", "trio_sandbox"]

#: The sandbox fixtures and the anyio backend each one needs.
_BACKENDS = {"sandbox": "asyncio", "trio_sandbox": "trio"}
_START_TIMEOUT = 30.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "Cloud Run Sandbox fixtures")
    group.addoption(
        "--sandbox-url",
        default=None,
        metavar="URL",
        help="run the sandbox fixtures against this service instead of an embedded local server",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Pin ``anyio_backend`` to the runtime of the sandbox fixture a test uses.

    anyio runs async tests on every installed backend by default; an asyncio
    sandbox cannot live on trio, nor the reverse. Added as a ``parametrize``
    mark before pytest reads the marks, so pytest treats it like the user's own.
    """
    needed = sorted({backend for name, backend in _BACKENDS.items() if name in metafunc.fixturenames})
    if len(needed) != 1 or "anyio_backend" not in metafunc.fixturenames:
        return  # no sandbox fixture, or both (the fixtures then explain the clash)
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        names = argnames.split(",") if isinstance(argnames, str) else list(argnames)
        if "anyio_backend" in (name.strip() for name in names):
            return  # the test chose its backends itself
    metafunc.definition.add_marker(pytest.mark.parametrize("anyio_backend", needed))


class _ServerThread:
    """A :class:`LocalServer` on its own thread and event loop."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = {"host": "127.0.0.1", "port": 0, **options}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandbox-test-server", daemon=True)
        self._server: LocalServer | None = None

    def start(self) -> str:
        from sandbox_server import LocalServer  # imported late: loading the plugin stays cheap

        self._thread.start()
        self._server = LocalServer(**self._options)
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(timeout=_START_TIMEOUT)
        return self._server.url

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(timeout=_START_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_START_TIMEOUT)
        self._loop.close()


@pytest.fixture(scope="session")
def sandbox_server_options() -> dict[str, Any]:
    """Keyword arguments for the session's ``LocalServer``; override it to change them."""
    return {}


@pytest.fixture(scope="session")
def sandbox_server_url(pytestconfig: pytest.Config, sandbox_server_options: dict[str, Any]) -> Iterator[str]:
    """URL of the sandbox service for this session: ``--sandbox-url``, else an embedded local server."""
    given: str | None = pytestconfig.getoption("sandbox_url")
    if given:
        yield given
        return
    server = _ServerThread(sandbox_server_options)
    try:
        yield server.start()
    finally:
        server.stop()


def _require_backend(anyio_backend: Any, fixture: str) -> None:
    name = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if name != _BACKENDS[fixture]:
        other = "trio_sandbox" if fixture == "sandbox" else "sandbox"
        pytest.fail(
            f"the {fixture!r} fixture needs anyio_backend {_BACKENDS[fixture]!r}, this test runs on {name!r}"
            f" (use {other!r} there)",
            pytrace=False,
        )


@pytest.fixture
async def sandbox(sandbox_server_url: str, anyio_backend: Any) -> AsyncIterator[Sandbox]:
    """An open asyncio sandbox on the session's server; killed after the test."""
    _require_backend(anyio_backend, "sandbox")
    from sandbox_asyncio import Sandbox

    opened = await Sandbox.create(sandbox_server_url)
    try:
        yield opened
    finally:
        await opened.kill()


@pytest.fixture
async def trio_sandbox(sandbox_server_url: str, anyio_backend: Any) -> AsyncIterator[sandbox_trio.Sandbox]:
    """An open trio sandbox on the session's server; killed after the test."""
    _require_backend(anyio_backend, "trio_sandbox")
    from sandbox_trio import Sandbox

    # The block owns the nursery the sandbox's reader runs in; leaving it kills the sandbox.
    async with Sandbox.create(sandbox_server_url) as opened:
        yield opened
