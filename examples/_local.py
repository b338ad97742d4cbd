"""Where the examples find a sandbox service: ``CLOUD_RUN_URL``, or a server started right here.

With ``CLOUD_RUN_URL`` set (e.g. ``https://my-service-abc123.a.run.app``) every
example talks to that deployment. Without it, an embedded
``sandbox_server.LocalServer`` on a free loopback port serves the example and
stops with it, so each example runs on a laptop with nothing else installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sandbox_server import LocalServer

__all__ = ["flaky_network", "service_url", "service_url_in_thread", "two_instances"]


@contextlib.asynccontextmanager
async def service_url(**options: Any) -> AsyncIterator[str]:
    """The service URL for an asyncio example; ``options`` go to ``LocalServer`` when one is started."""
    url = os.environ.get("CLOUD_RUN_URL")
    if url:
        yield url
        return
    async with LocalServer(host="127.0.0.1", port=0, **options) as server:
        yield server.url


@contextlib.contextmanager
def service_url_in_thread(**options: Any) -> Iterator[str]:
    """The service URL for a program that is not on asyncio (trio).

    The local server is asyncio code, so it gets a thread and an event loop of its own.
    """
    url = os.environ.get("CLOUD_RUN_URL")
    if url:
        yield url
        return
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="local-sandbox-server", daemon=True)
    thread.start()
    server = LocalServer(host="127.0.0.1", port=0, **options)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield server.url
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@contextlib.asynccontextmanager
async def two_instances(**options: Any) -> AsyncIterator[tuple[str, str]]:
    """Two URLs that reach different instances of one service.

    Locally: two servers sharing one state directory, the way Cloud Run
    instances share a storage bucket. With ``CLOUD_RUN_URL``, both are that URL
    and the load balancer decides where each connection lands.
    """
    url = os.environ.get("CLOUD_RUN_URL")
    if url:
        yield url, url
        return
    with tempfile.TemporaryDirectory(prefix="sandbox-state-") as state_dir:
        async with (
            LocalServer(host="127.0.0.1", port=0, state_dir=state_dir, **options) as first,
            LocalServer(host="127.0.0.1", port=0, state_dir=state_dir, **options) as second,
        ):
            yield first.url, second.url


class _Proxy:
    """A loopback TCP proxy whose connections can be cut, like a network that drops."""

    def __init__(self, target: str) -> None:
        host, _, port = target.split("://", 1)[1].rpartition(":")
        self._target = (host, int(port))
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Abort every open connection: both ends see the TCP connection die with no close frame."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@contextlib.asynccontextmanager
async def flaky_network(url: str) -> AsyncIterator[tuple[str, _Proxy | None]]:
    """A URL through a proxy that can drop connections, for a local server.

    A real deployment cannot be made to drop on demand, so with
    ``CLOUD_RUN_URL`` this yields the URL unchanged and no proxy.
    """
    if os.environ.get("CLOUD_RUN_URL"):
        yield url, None
        return
    proxy = _Proxy(url)
    await proxy.start()
    try:
        yield proxy.url, proxy
    finally:
        await proxy.stop()
