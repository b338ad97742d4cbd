"""Test helpers: a local server on its own thread and event loop, and a silent TCP server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from _sync_facade import Opening

import sandbox_asyncio
import sandbox_sync
import sandbox_trio
from sandbox_server import LocalServer


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll with a deadline, for state that no event announces (another thread's, or a private flag)."""
    deadline = anyio.current_time() + timeout
    while not predicate():
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.005)


async def start_server_process(
    *options: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """``python -m sandbox_server --port 0 OPTIONS`` as a real process (asyncio); it and the URL it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandbox_server",
        "--port",
        "0",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = (await proc.stdout.readline()).decode()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return proc, line.split()[-1]


class ServerThread:
    """A :class:`LocalServer` on a random loopback port, in a thread with its own loop.

    Keeping the server off the test's event loop means a test that blocks its
    loop, or a test framework that runs trio, cannot stall the server.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandbox-server", daemon=True)
        self._server: LocalServer | None = None
        self.url = ""

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._server = LocalServer(host="127.0.0.1", port=0, **self._options)
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(timeout=30)
        self.url = self._server.url
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers: a hung service."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        listener.close()


class CuttingProxy:
    """A loopback TCP proxy, on its own thread, that drops every connection on command.

    ``cut()`` aborts both sides of every open connection (the client sees an
    abnormal close, the server a reset), like a network drop. ``freeze()`` is
    a black hole instead: nothing is forwarded any more, in either direction,
    and nothing is closed (no FIN, no reset) until ``unfreeze()``.
    """

    def __init__(self, target_url: str, *, on_request: Callable[[str | None], None] | None = None) -> None:
        #: Called with each handshake's Authorization header (``None`` if absent).
        self._on_request = on_request
        host_port = target_url.split("://", 1)[1]
        host, port = host_port.rsplit(":", 1)
        self._target = (host, int(port))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cutting-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.url = ""
        self._gate = asyncio.Event()
        #: Cleared while frozen: the pipes hold what they read, an end included.
        self._flowing = asyncio.Event()
        self._flowing.set()

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        self._loop.call_soon_threadsafe(self._gate.set)
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        self.unfreeze()  # so that every pipe sees its end and finishes
        self.cut()
        assert self._server is not None
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self._gate.wait()  # held while the "network" is down
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        if self._on_request is not None:
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                head = await reader.readuntil(b"\r\n\r\n")
                up_writer.write(head)
                self._on_request(_header(head, "authorization"))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    # Frozen: what was read waits here, an end too, and nothing more is read.
                    await self._flowing.wait()
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except OSError:
                await self._flowing.wait()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def stop_accepting(self) -> None:
        """Refuse new connections from now on (the service is gone)."""
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._close_listener(), self._loop).result(timeout=10)

    async def _close_listener(self) -> None:
        assert self._server is not None
        self._server.close()

    def cut(self, *, hold: bool = False) -> None:
        """Abort every open connection now; with ``hold``, new ones wait for :meth:`release`."""

        def abort_all() -> None:
            if hold:
                self._gate.clear()
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        asyncio.run_coroutine_threadsafe(_call(abort_all), self._loop).result(timeout=10)

    def release(self) -> None:
        """Let held and new connections through again."""
        self._loop.call_soon_threadsafe(self._gate.set)

    def freeze(self) -> None:
        """Stop forwarding on every connection, both ways, closing nothing: packets vanish."""
        asyncio.run_coroutine_threadsafe(_call(self._flowing.clear), self._loop).result(timeout=10)

    def unfreeze(self) -> None:
        """Forward again what was held, and everything after it."""
        asyncio.run_coroutine_threadsafe(_call(self._flowing.set), self._loop).result(timeout=10)


async def _call(function: Callable[[], None]) -> None:
    function()


def _header(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


@dataclass
class Client:
    """Opens sandboxes the way a user of one runtime and transport would."""

    transport: str
    nursery: Any = None

    @property
    def module(self) -> Any:
        if self.transport == "sync":
            return sandbox_sync
        return sandbox_trio if self.transport.startswith("trio") else sandbox_asyncio

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        if self.transport == "aiohttp":
            options.setdefault("transport", "aiohttp")
        elif self.transport.startswith("trio"):
            options.setdefault("nursery", self.nursery)
            if self.transport == "trio-websocket":
                options.setdefault("transport", "trio-websocket")
        return options

    def create(self, url: str, **options: Any) -> Any:
        if self.transport == "sync":  # blocking calls behind an async face: see _sync_facade
            return Opening(lambda: sandbox_sync.Sandbox.create(url, **options))
        return self.module.Sandbox.create(url, **self._options(options))

    def attach(self, url: str, sandbox_id: str, token: str, **options: Any) -> Any:
        if self.transport == "sync":
            return Opening(lambda: sandbox_sync.Sandbox.attach(url, sandbox_id, token, **options))
        return self.module.Sandbox.attach(url, sandbox_id, token, **self._options(options))
