"""The no-hang guarantee: every public asyncio call returns or raises within its timeout.

Servers that misbehave in time rather than in content: one that accepts TCP and
never answers, one that sends half an HTTP 101 and stalls, ones that stop after
``SANDBOX_RUNNING`` or in the middle of an exec's output, and one that stops
reading so that the client's sends block on a full TCP window. Each call is
wrapped in ``asyncio.timeout(t + MARGIN)`` and its elapsed time measured; no
sleep is used to synchronise anything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from _support import silent_server
from websockets.asyncio.server import ServerConnection, serve

from sandbox_asyncio import Sandbox
from sandbox_proto import SandboxConnectionError, SandboxException, SandboxStateError, SandboxTimeoutError

pytestmark = pytest.mark.anyio

T = 0.5
MARGIN = 2.5
#: A deliberate close() waits at most the adapter's close timeout (5 s) for a peer that
#: does not read. (A session ended by a timeout drops the socket instead: no wait.)
CLOSE_BOUND = 5.0

RUNNING = '{"event":"status_update","status":"SANDBOX_RUNNING","extensions":["exit_code","seq","close_stdin"]}'
SETUP = [
    '{"event":"status_update","status":"SANDBOX_CREATING"}',
    '{"event":"sandbox_id","sandbox_id":"sandbox-x","sandbox_token":"tok"}',
    RUNNING,
]
EXEC_RUNNING = '{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING"}'


async def within(call: Awaitable[Any], timeout: float = T) -> tuple[Any, BaseException | None]:
    """Await ``call``; it must finish within ``timeout`` plus a margin. Returns (result, exception)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    result: Any = None
    error: BaseException | None = None
    try:
        async with asyncio.timeout(timeout + MARGIN):
            try:
                result = await call
            except SandboxException as exc:
                error = exc
    except TimeoutError:
        raise AssertionError(f"the call hung: still running {loop.time() - started:.1f}s later") from None
    elapsed = loop.time() - started
    assert elapsed <= timeout + MARGIN, elapsed
    return result, error


@contextlib.asynccontextmanager
async def half_handshake_server() -> AsyncIterator[str]:
    """Reads the upgrade request, sends part of a 101 response, then stalls."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upg")
            await writer.drain()
            await reader.read()  # until the client gives up

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()


@contextlib.asynccontextmanager
async def scripted(frames_after_exec: list[str]) -> AsyncIterator[str]:
    """Setup, then (after the exec request) ``frames_after_exec``, then silence with the socket open."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            await ws.recv()  # init
            for frame in SETUP:
                await ws.send(frame)
            while "language" not in json.loads(await ws.recv()):
                pass
            for frame in frames_after_exec:
                await ws.send(frame)
            while True:
                await ws.recv()  # read and ignore, until the client closes

    async with serve(handler, "127.0.0.1", 0, ping_interval=None, max_size=None) as server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def server_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    return bytes([0x81, len(payload)]) + payload


async def read_client_frame(reader: asyncio.StreamReader) -> bytes:
    """One masked client frame's payload (RFC 6455 5.2), unfragmented."""
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    mask = await reader.readexactly(4)
    data = await reader.readexactly(length)
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@contextlib.asynccontextmanager
async def stalling_server() -> AsyncIterator[str]:
    """A raw WebSocket server: setup, RUNNING for the exec, then it stops reading the socket.

    (``websockets`` keeps reading into memory whatever its ``max_queue``, so the
    TCP window would never fill with it.)
    """
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception):
            request = await reader.readuntil(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            await read_client_frame(reader)  # init
            for frame in SETUP:
                writer.write(server_frame(frame))
            while b"language" not in await read_client_frame(reader):
                pass
            writer.write(server_frame(EXEC_RUNNING))
            await writer.drain()
            writer.transport.pause_reading()  # from now on the client's sends pile up

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()


@contextlib.asynccontextmanager
async def silent_after_running() -> AsyncIterator[str]:
    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            await ws.recv()
            for frame in SETUP:
                await ws.send(frame)
            while True:
                await ws.recv()  # read and ignore, until the client closes

    async with serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["silent", "half-handshake"])
async def test_create_and_attach_return_within_their_timeout(kind: str) -> None:
    if kind == "silent":
        with silent_server() as url:
            await _open_both(url)
    else:
        async with half_handshake_server() as url:
            await _open_both(url)


async def _open_both(url: str) -> None:
    for opening in (Sandbox.create(url, timeout=T), Sandbox.attach(url, "sandbox-x", "tok", timeout=T)):
        _, error = await within(opening)
        assert isinstance(error, SandboxConnectionError | SandboxTimeoutError), error


async def test_silence_after_running_every_call_bounded() -> None:
    async with silent_after_running() as url:
        sandbox, _ = await within(Sandbox.create(url, timeout=T))
        _, error = await within(sandbox.snapshot_filesystem("snap", timeout=T))
        assert isinstance(error, SandboxTimeoutError), error
        _, error = await within(sandbox.exec("python", "print(1)", timeout=T))
        assert isinstance(error, SandboxTimeoutError), error
        # A timed-out exec is abandoned (killed once it starts): the sandbox stays usable,
        # and the next exec waits behind it, bounded by its own timeout.
        assert sandbox.state == "running"
        _, error = await within(sandbox.exec("python", "print(2)", timeout=T))
        assert isinstance(error, SandboxTimeoutError), error
        # A checkpoint sent and never answered leaves the session untrustworthy: later calls fail at once.
        _, error = await within(sandbox.checkpoint(timeout=T))
        assert isinstance(error, SandboxTimeoutError), error
        assert sandbox.state == "failed"
        _, error = await within(sandbox.checkpoint(timeout=T))
        assert isinstance(error, SandboxStateError), error
        _, error = await within(sandbox.wait_closed(timeout=T))
        assert error is None
        await within(sandbox.kill(timeout=T))
        await within(sandbox.close())


async def test_checkpoint_with_no_answer_is_bounded() -> None:
    async with silent_after_running() as url:
        sandbox, _ = await within(Sandbox.create(url, timeout=T))
        _, error = await within(sandbox.checkpoint(timeout=T))
        assert isinstance(error, SandboxTimeoutError), error
        await within(sandbox.close())


async def test_silence_mid_output_every_process_call_bounded() -> None:
    async with scripted([EXEC_RUNNING, '{"event":"stdout","data":"half a li","seq":1}']) as url:
        sandbox, _ = await within(Sandbox.create(url, timeout=T))
        process, _ = await within(sandbox.exec("python", "x", timeout=T))
        chunk, _ = await within(process.stdout.read(timeout=T))
        assert chunk == "half a li"
        for call in (
            process.stdout.read(timeout=T),
            process.stdout.readline(timeout=T),
            process.stdout.read_all(timeout=T),
            process.stderr.readline(timeout=T),
            process.wait(timeout=T),
        ):
            _, error = await within(call)
            assert isinstance(error, SandboxTimeoutError), error
        _, error = await within(process.write_to_stdin("more\n", timeout=T))
        assert error is None
        # The kill is never answered: the process is given up after the kill timeout (7.5).
        _, error = await within(process.kill(timeout=T))
        assert error is None and process.done
        _, error = await within(process.wait(timeout=T))
        assert error is None
        _, error = await within(sandbox.snapshot_filesystem("snap", timeout=T))
        assert isinstance(error, SandboxTimeoutError), error
        await within(sandbox.kill(timeout=T))
        assert sandbox.state == "killed"


async def test_silence_right_after_exec_running_read_all_keeps_what_it_gathered() -> None:
    frames = [EXEC_RUNNING, '{"event":"stdout","data":"abc\\n","seq":1}', '{"event":"stdout","data":"de","seq":2}']
    async with scripted(frames) as url:
        sandbox, _ = await within(Sandbox.create(url, timeout=T))
        process, _ = await within(sandbox.exec("python", "x", timeout=T))
        _, error = await within(process.stdout.read_all(timeout=T))
        assert isinstance(error, SandboxTimeoutError)
        line, _ = await within(process.stdout.readline(timeout=T))
        assert line == "abc\n"  # a timed-out read_all loses nothing
        await within(sandbox.close())


async def test_stalled_tcp_window_stdin_and_every_call_bounded() -> None:
    async with stalling_server() as url:
        sandbox, _ = await within(Sandbox.create(url, timeout=T))
        process, _ = await within(sandbox.exec("python", "x", timeout=T))
        chunk = "z" * 2**20
        for _ in range(64):  # far more than loopback buffers hold
            _, error = await within(process.write_to_stdin(chunk, timeout=T))
            if error is not None:
                break
        assert isinstance(error, SandboxTimeoutError), "the sends never blocked"
        for call in (process.wait(timeout=T), process.stdout.read(timeout=T)):
            _, error = await within(call)
            assert isinstance(error, SandboxTimeoutError), error
        await within(process.kill(timeout=T))
        _, error = await within(sandbox.snapshot_filesystem("snap", timeout=T))
        assert isinstance(error, SandboxException), error
        _, error = await within(sandbox.checkpoint(timeout=T))
        assert isinstance(error, SandboxTimeoutError), error
        assert sandbox.state == "failed"
        await within(sandbox.kill(timeout=T))
        await within(sandbox.close(), timeout=CLOSE_BOUND)


async def test_stalled_tcp_window_exec_timeout_and_close_bounded() -> None:
    async with stalling_server() as url:
        sandbox, _ = await within(Sandbox.create(url, timeout=T))
        process, _ = await within(sandbox.exec("python", "x", timeout=T))
        while (await within(process.write_to_stdin("z" * 2**20, timeout=T)))[1] is None:
            pass
        _, error = await within(sandbox.close(), timeout=CLOSE_BOUND)
        assert error is None and sandbox.state == "closed"
        _, error = await within(process.wait(timeout=T))
        assert isinstance(error, SandboxStateError), error  # woken by the close, not by its timeout
