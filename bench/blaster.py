"""A WebSocket server that speaks just enough of the protocol, as fast as it can.

Run as ``python -m bench.blaster``: it prints its port and serves until killed.
It writes pre-encoded frames straight to the socket (no per-message encoding)
and waits for the socket to drain between blocks, so a client that stops
reading stops it (back-pressure), and it is never the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import wire


async def _blast(ws: ServerConnection, count: int, size: int) -> None:
    write = ws.transport.write
    write(wire.exec_running())
    if count and size:
        block, per_block = wire.output_block(size)
        full, rest = divmod(count, per_block)
        for _ in range(full):
            write(block)
            await ws.drain()
        if rest:
            write(block[: rest * len(block) // per_block])
    write(wire.exec_done())
    await ws.drain()


async def _handle(ws: ServerConnection) -> None:
    with contextlib.suppress(ConnectionClosed):  # clients that just drop are not an error here
        await _serve_one(ws)


async def _serve_one(ws: ServerConnection) -> None:
    # Raw writes bypass websockets' framing; safe because messages are never
    # fragmented and compression is off, so frame boundaries are all it tracks.
    write = ws.transport.write
    first = True
    async for message in ws:
        obj = json.loads(message)
        if first:
            first = False
            write(wire.create_reply())
        elif obj.get("action") == "kill_sandbox":
            write(wire.kill_reply())
            await ws.close()
            return
        elif "language" in obj:
            count, size = (int(part) for part in obj["code"].split())
            await _blast(ws, count, size)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve() -> None:
    raise_fd_limit()
    # No open_timeout: a client opening 10,000 connections at once takes longer than
    # websockets' 10 s to send its last handshake, and that is the client's time to measure.
    async with serve(
        _handle, "127.0.0.1", 0, compression=None, ping_interval=None, max_size=None, backlog=4096, open_timeout=None
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(port, flush=True)  # noqa: T201 - the parent reads the port from stdout
        await server.serve_forever()


class Blaster:
    """The blaster in a child process (its own core on a 2-core machine)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.url = ""
        self.pid = 0

    def __enter__(self) -> Blaster:
        root = Path(__file__).resolve().parent.parent
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.blaster"], cwd=root, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        port = int(self._process.stdout.readline())
        self.url = f"http://127.0.0.1:{port}"
        self.pid = self._process.pid
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve())
