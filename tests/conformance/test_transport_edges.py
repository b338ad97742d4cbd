"""What every transport must get right below the protocol, on every transport.

Back-pressure against the local server; fragmented and invalid messages from
a scripted server (websockets' sync server on a thread) that writes what a
well-behaved server never would.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator

import pytest
from _support import Client, ServerThread, wait_until
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

from sandbox_proto import SandboxException

pytestmark = pytest.mark.anyio

SETUP = [
    '{"event":"status_update","status":"SANDBOX_CREATING"}',
    '{"event":"sandbox_id","sandbox_id":"sandbox-edge","sandbox_token":"tok"}',
    '{"event":"status_update","status":"SANDBOX_RUNNING","extensions":["exit_code"]}',
]
DONE = '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":0}'
RUNNING = '{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING"}'


async def test_full_buffers_pause_the_socket_and_nothing_is_lost(client: Client, server: ServerThread) -> None:
    limit = 64 * 1024
    lines = 20_000  # ~1.2 MB of output, 18 times the buffer
    code = f"import sys\nfor i in range({lines}): sys.stdout.write(f'{{i:08d}} ' + 'x' * 50 + '\\n')"
    async with client.create(server.url, stream_buffer_size=limit) as sandbox:
        process = await sandbox.exec("python", code)
        # Nobody reads: the buffers fill and the driver stops reading the socket.
        await wait_until(lambda: sandbox._reading_paused, 30, "reading to pause")
        held = process._budget.used
        assert limit <= held <= limit + 2**20  # at most what one socket read had parsed beyond the limit
        out = await process.stdout.read_all(timeout=60)
        await process.wait()
    assert out.count("\n") == lines
    assert [int(line[:8]) for line in out.splitlines()] == list(range(lines))


@contextlib.contextmanager
def scripted_server(script: Callable[[ServerConnection], None]) -> Iterator[tuple[str, list[int]]]:
    """A server that answers setup, then runs ``script``; yields its URL and the close codes it received."""
    codes: list[int] = []

    def handler(ws: ServerConnection) -> None:
        ws.recv(timeout=10)  # the init message
        for text in SETUP:
            ws.send(text)
        try:
            script(ws)
            while "kill_sandbox" not in str(ws.recv(timeout=10)):
                pass
            ws.send('{"event":"status_update","status":"SANDBOX_KILLED"}')
            ws.close()
        except ConnectionClosed as closed:
            if closed.rcvd is not None:
                codes.append(closed.rcvd.code)
        except TimeoutError:
            codes.append(-1)

    with serve(handler, "127.0.0.1", 0) as ws_server:
        thread = threading.Thread(target=ws_server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{ws_server.socket.getsockname()[1]}", codes
        finally:
            ws_server.shutdown()
            thread.join(timeout=10)


def _exec_then(frames: Callable[[ServerConnection], None]) -> Callable[[ServerConnection], None]:
    def script(ws: ServerConnection) -> None:
        assert "language" in json.loads(ws.recv(timeout=10))
        ws.send(RUNNING)
        frames(ws)

    return script


async def test_a_fragmented_message_arrives_whole(client: Client) -> None:
    data = "é" * 3000 + "\n"  # two-byte characters, split across fragments mid-character
    text = json.dumps({"event": "stdout", "data": data}, ensure_ascii=False)

    def fragmented(ws: ServerConnection) -> None:
        pieces = [text[:1000], text[1000:2500], text[2500:]]
        ws.send(iter(pieces))  # one message in three frames
        ws.send(DONE)

    with scripted_server(_exec_then(fragmented)) as (url, _):
        async with client.create(url) as sandbox:
            process = await sandbox.exec("python", "x", timeout=10)
            assert await process.stdout.read_all(timeout=10) == data
            assert await process.wait(timeout=10) == 0


async def test_invalid_utf8_fails_the_connection_and_wakes_every_waiter(client: Client, transport: str) -> None:
    def invalid(ws: ServerConnection) -> None:
        ws.socket.sendall(b"\x81\x02\xff\xfe")  # FIN + text, 2 bytes that are not UTF-8

    with scripted_server(_exec_then(invalid)) as (url, codes):
        sandbox = await client.create(url)
        process = await sandbox.exec("python", "x", timeout=10)
        with pytest.raises(SandboxException):
            await process.wait(timeout=10)
        assert await sandbox.wait_closed(timeout=10) is not None
        await sandbox.close()
    if transport in ("websockets", "trio"):  # ours: websockets' parser, and we say why
        assert codes == [1007]
