"""Clients that stop reading: dropped after ``send_timeout``, bounded memory meanwhile, bounded shutdown.

The server runs in a subprocess so that its RSS can be measured; the clients
are raw ``websockets`` connections with a small receive buffer that stop
reading mid-stream (their transport is paused), as a hung or malicious peer
does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from websockets.asyncio.client import ClientConnection, connect

from sandbox_server._app import MAX_QUEUE, WRITE_LIMIT

from ._server_wire import Wire, attach_when_free, pid_alive, with_extensions, ws_base

pytestmark = pytest.mark.anyio

logger = logging.getLogger(__name__)

MiB = 2**20
#: What a stalled peer sends after it stopped reading: stdin frames the server refuses with a short error.
BIG_FRAMES = 16
BIG_FRAME = 1 * MiB
#: One output frame on the wire: up to 1027 bytes of data plus the JSON around it (ASCII output here).
OUTPUT_FRAME = 1100
#: What one stalled connection may hold for this traffic (docs/local-server.md): incoming frames queued
#: and the one in hand (bytes, str, parsed), 256 output frames queued, the write buffer.
CONNECTION_BOUND = (MAX_QUEUE[0] + 2) * BIG_FRAME + 3 * BIG_FRAME + 256 * OUTPUT_FRAME + WRITE_LIMIT[0] + OUTPUT_FRAME
#: Interpreter noise on top (allocator arenas, a thread or two for file work).
SLACK = 12 * MiB

RUNNER = """
import asyncio, logging, signal, sys
from sandbox_server import LocalServer

async def main() -> None:
    server = LocalServer(port=0, isolation="none", send_timeout=float(sys.argv[1]))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await server.start()
    print(f"listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
asyncio.run(main())
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class ServerProcess:
    """A server subprocess, its URL, and its log lines as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        assert proc.stderr is not None
        self._reader = asyncio.create_task(self._read(proc.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace"))
            self._changed.set()

    async def wait_for_lines(self, text: str, count: int, limit: float) -> None:
        async with asyncio.timeout(limit):
            while sum(text in line for line in self.lines) < count:
                self._changed.clear()
                await self._changed.wait()

    @property
    def rss(self) -> int:
        return rss(self.proc.pid)


@contextlib.asynccontextmanager
async def server_process(*argv: str) -> AsyncIterator[ServerProcess]:
    proc = await asyncio.create_subprocess_exec(sys.executable, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield ServerProcess(proc, line.split()[-1])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stalling_peer(url: str, output: int) -> tuple[ClientConnection, str, str, int, int, asyncio.Task[None]]:
    """Create, run an exec writing ``output`` bytes, read a little of it, then stop reading and send big frames.

    Returns the socket, the sandbox id and token, the exec's pid, the last seq read, and the sending task.
    """
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    # A small receive buffer, so that what the kernels hold does not hide the stall.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    # Asks for the extensions: it reads output seq numbers and its stdin frames are numbered.
    create = ws_base(url) + with_extensions("/create", "extended")
    ws = await connect(create, sock=sock, compression=None, max_size=None, max_queue=4)
    await ws.send("{}")
    frame: dict[str, Any] = {}
    while frame.get("status") != "SANDBOX_RUNNING":
        frame = json.loads(await ws.recv())
        if frame.get("event") == "sandbox_id":
            sandbox_id, token = frame["sandbox_id"], frame["sandbox_token"]
    code = f"import os, sys\nprint(os.getpid(), flush=True)\nsys.stdout.write('y' * {output})\n"
    await ws.send(json.dumps({"language": "python", "code": code}))
    pid = last_seq = 0
    while last_seq < 20:
        frame = json.loads(await ws.recv())
        if frame.get("event") == "stdout":
            if last_seq == 0:
                pid = int(frame["data"].split()[0])
            last_seq = frame["seq"]
    ws.transport.pause_reading()  # reads nothing from now on

    async def send_big_frames() -> None:
        with contextlib.suppress(Exception):
            for _ in range(BIG_FRAMES):
                await ws.send(json.dumps({"event": "stdin", "data": "z" * BIG_FRAME, "seq": 0}))

    return ws, sandbox_id, token, pid, last_seq, asyncio.create_task(send_big_frames())


async def sample_max_rss(server: ServerProcess, until: asyncio.Future[Any], limit: float) -> int:
    """The largest RSS seen while waiting for ``until`` (polled: the kernel gives no event for RSS)."""
    peak = server.rss
    async with asyncio.timeout(limit):
        while not until.done():
            peak = max(peak, server.rss)
            await asyncio.wait([until], timeout=0.05)
    return max(peak, server.rss)


async def test_a_client_that_stops_reading_is_dropped_and_its_output_replayed() -> None:
    send_timeout = 2.0
    output = 12 * MiB  # below the 16 MiB output log: everything stays replayable
    async with server_process("-c", RUNNER, str(send_timeout)) as server:
        base = server.rss
        ws, sandbox_id, token, _, last_seq, sender = await stalling_peer(server.url, output)
        stopped_reading = time.monotonic()
        dropped = asyncio.ensure_future(server.wait_for_lines("dropping the connection", 1, send_timeout + 20))
        peak = await sample_max_rss(server, dropped, send_timeout + 25)
        await dropped
        elapsed = time.monotonic() - stopped_reading
        # Dropped within the bound (plus the watchdog's check interval and the time the buffers take to fill).
        logger.info("dropped %.2f s after it stopped reading; RSS %+.1f MiB at peak", elapsed, (peak - base) / MiB)
        assert elapsed < send_timeout + 5, elapsed
        log_bound = output * 1.25  # the output log's frames as Python objects
        assert peak - base < log_bound + CONNECTION_BOUND + SLACK, (peak - base) / MiB
        assert not any(token in line for line in server.lines)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await ws.close()

        # The output it did not read is all there, in order, after what it did read.
        old = cast(Wire, SimpleNamespace(sandbox_id=sandbox_id, token=token))
        wire = await attach_when_free(server.url, "extended", old)
        frame = await wire.frame()
        assert frame == {"event": "status_update", "status": "SANDBOX_RUNNING"}
        await wire.send({"action": "reconnect", "last_seq": last_seq})
        assert await wire.frame() == {"event": "status_update", "status": "SANDBOX_EXECUTION_RUNNING"}
        received = await wire.collect()
        assert received.seqs == list(range(last_seq + 1, last_seq + 1 + len(received.seqs)))
        assert received.exit_code == 0
        assert received.stdout.endswith("y" * 100)
        assert received.stdout.count("y") > output - 20 * 1024  # the first 20 frames were read before
        await wire.close()


async def test_twenty_stalled_clients_bounded_memory_and_sigterm_within_ten_seconds() -> None:
    peers_count = 20
    output = 6 * MiB
    # The real command line, default send_timeout (30 s): the clients are still stalled at SIGTERM.
    async with server_process("-m", "sandbox_server", "--port", "0", "--isolation", "none") as server:
        base = server.rss
        peers = await asyncio.gather(*(stalling_peer(server.url, output) for _ in range(peers_count)))
        # Stalled once the server's RSS stops growing (polled: no event tells).
        peak, previous = server.rss, 0
        async with asyncio.timeout(30):
            while abs(server.rss - previous) > MiB:
                previous = server.rss
                peak = max(peak, previous)
                await asyncio.sleep(0.5)
        peak = max(peak, server.rss)
        bound = peers_count * (output * 1.25 + CONNECTION_BOUND) + SLACK
        logger.info(
            "RSS %.1f MiB, %+.1f MiB with %d stalled clients (bound %.1f MiB)",
            base / MiB,
            (peak - base) / MiB,
            peers_count,
            bound / MiB,
        )
        assert peak - base < bound, ((peak - base) / MiB, bound / MiB)

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await server.proc.wait()
        stop_time = time.monotonic() - started
        assert code == 0
        logger.info("stopped %.2f s after SIGTERM", stop_time)
        assert stop_time < 10, stop_time
        for _, _, token, pid, _, sender in peers:
            assert not pid_alive(pid)
            assert not any(token in line for line in server.lines)
            sender.cancel()
        for ws, *_ in peers:
            ws.transport.abort()
