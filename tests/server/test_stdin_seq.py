"""Extension ``stdin_seq`` over a real socket: numbered stdin, written exactly once across reconnects.

Frames are read raw here (not through ``Wire.frame``), since ``stdin_ack``
carries a ``seq`` that is not an output frame's.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from server._server_wire import TIMEOUT, Wire, attach_when_free, err, st

from sandbox_proto import MSG_INVALID_STDIN_SEQ, STDIN_ACK_BYTES
from sandbox_server import LocalServer

pytestmark = pytest.mark.anyio

RUNNING_EXTENDED = (
    '{"event":"status_update","status":"SANDBOX_RUNNING",'
    '"extensions":["close_stdin","exec_ref","exit_code","seq","stdin_seq"]}'
)
EXEC_RUNNING = st("SANDBOX_EXECUTION_RUNNING")
#: Prints every line it reads, as it reads it, until end-of-file.
ECHO = "import sys\nfor line in sys.stdin:\n    print(line, end='', flush=True)"


def ack(seq: int) -> str:
    return '{"event":"stdin_ack","seq":' + str(seq) + "}"


def stdin(data: str, seq: object = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"event": "stdin", "data": data}
    if seq is not None:
        frame["seq"] = seq
    return frame


async def create(server: LocalServer) -> Wire:
    wire = await Wire.open(server.url, "/create", server.protocol)
    await wire.send("{}")
    assert await wire.recv_raw() == st("SANDBOX_CREATING")
    frame = json.loads(await wire.recv_raw())
    wire.sandbox_id, wire.token = frame["sandbox_id"], frame["sandbox_token"]
    assert await wire.recv_raw() == (RUNNING_EXTENDED if server.protocol == "extended" else st("SANDBOX_RUNNING"))
    return wire


async def reattach(server: LocalServer, old: Wire) -> Wire:
    wire = await attach_when_free(server.url, server.protocol, old)
    assert await wire.recv_raw() == (RUNNING_EXTENDED if server.protocol == "extended" else st("SANDBOX_RUNNING"))
    return wire


async def start(wire: Wire, code: str, language: str = "python") -> None:
    await wire.send({"language": language, "code": code})
    assert await wire.recv_raw() == EXEC_RUNNING


async def collect(wire: Wire) -> tuple[str, list[str]]:
    """Stdout up to the exec's DONE, and every other frame on the way (DONE included)."""
    out: list[str] = []
    others: list[str] = []
    while True:
        raw = await wire.recv_raw()
        frame = json.loads(raw)
        if frame["event"] == "stdout":
            out.append(frame["data"])
            continue
        others.append(raw)
        if frame.get("status") == "SANDBOX_EXECUTION_DONE":
            return "".join(out), others


async def read_stdout_until(wire: Wire, wanted: str) -> tuple[str, int | None]:
    """Stdout until it ends with ``wanted`` (no other frame in between), and the last output seq."""
    text = ""
    seq: int | None = None
    while not text.endswith(wanted):
        frame = json.loads(await wire.recv_raw())
        assert frame["event"] == "stdout", frame
        text += frame["data"]
        seq = frame.get("seq")
    return text, seq


async def barrier(wire: Wire) -> None:
    """Frames are handled one at a time (S8): once this one is answered, every earlier one was handled."""
    await wire.send(stdin("", seq=0))
    assert await wire.recv_raw() == st("SANDBOX_STDIN_ERROR")
    assert await wire.recv_raw() == err(MSG_INVALID_STDIN_SEQ)


async def test_numbered_stdin_is_written_once_in_order(local: LocalServer) -> None:
    wire = await create(local)
    await start(wire, ECHO)
    for seq, data in ((1, "a\n"), (2, "b\n"), (2, "b\n"), (1, "a\n"), (3, "c\n")):
        await wire.send(stdin(data, seq))
    await wire.send({"event": "stdin", "data": "unnumbered\n"})  # accepted, not counted
    await wire.send({"action": "close_stdin", "seq": 4})
    await wire.send({"action": "close_stdin", "seq": 4})  # a duplicate close is dropped too
    out, others = await collect(wire)
    assert out == "a\nb\nc\nunnumbered\n"
    assert others == ['{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":0}']


async def test_each_exec_counts_from_one(local: LocalServer) -> None:
    wire = await create(local)
    for word in ("first", "second"):
        await start(wire, ECHO)
        await wire.send(stdin(word + "\n", 1))
        await wire.send({"action": "close_stdin", "seq": 2})
        out, _ = await collect(wire)
        assert out == word + "\n"


async def test_reconnect_reply_starts_with_the_ack(local: LocalServer) -> None:
    first = await create(local)
    await start(first, ECHO)
    for seq, data in enumerate(("a\n", "b\n", "c\n"), start=1):
        await first.send(stdin(data, seq))
    _, last_seq = await read_stdout_until(first, "c\n")
    first.ws.transport.abort()
    second = await reattach(local, first)
    await second.send({"action": "reconnect", "last_seq": last_seq, "stdin_seq": True})
    assert await second.recv_raw() == ack(3)
    assert await second.recv_raw() == EXEC_RUNNING
    # A resend at or below the ack is dropped; what follows is written.
    await second.send(stdin("c\n", 3))
    await second.send(stdin("d\n", 4))
    await second.send({"action": "close_stdin", "seq": 5})
    out, others = await collect(second)
    assert out == "d\n"
    assert others == ['{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":0}']


async def test_stdin_queued_by_a_dead_connection_is_written_before_the_next_ones(plain_local: LocalServer) -> None:
    first = await create(plain_local)
    sandbox = plain_local.manager.get(first.sandbox_id)
    assert sandbox is not None
    # The process reads nothing until the flag file exists; a big first write fills the
    # pipe and the transport's buffer, so what follows waits in the server's queue.
    code = (
        "import os, sys, time\n"
        "while not os.path.exists('go'):\n"
        "    time.sleep(0.01)\n"
        "lines = sys.stdin.read().splitlines()\n"
        "print(' '.join(line[0] + str(len(line)) for line in lines))"
    )
    await start(first, code)
    await first.send(stdin("A" * 200_000 + "\n", 1))
    await first.send(stdin("B\n", 2))
    await first.send(stdin("C\n", 3))
    await barrier(first)
    first.ws.transport.abort()
    second = await reattach(plain_local, first)
    await second.send({"action": "reconnect", "stdin_seq": True})
    assert await second.recv_raw() == ack(3)
    assert await second.recv_raw() == EXEC_RUNNING
    await second.send(stdin("C\n", 3))  # a resend: dropped
    await second.send(stdin("D\n", 4))
    await second.send({"action": "close_stdin", "seq": 5})
    await barrier(second)
    (sandbox.directory / "go").touch()
    out, _ = await collect(second)
    assert out == "A200000 B1 C1 D1\n"


async def test_periodic_ack_every_16_frames_or_256_kib(local: LocalServer) -> None:
    wire = await create(local)
    await start(wire, "cat > /dev/null", language="bash")
    for seq in range(1, 16):
        await wire.send(stdin("x", seq))
    await barrier(wire)  # no ack came before it
    await wire.send(stdin("x", 16))
    assert await wire.recv_raw() == ack(16)
    await wire.send(stdin("x" * STDIN_ACK_BYTES, 17))  # one frame, but 256 KiB
    assert await wire.recv_raw() == ack(17)
    await wire.send(stdin("é" * (STDIN_ACK_BYTES // 2 - 1), 18))  # bytes of UTF-8 count, not characters
    await barrier(wire)
    await wire.send(stdin("xy", 19))
    assert await wire.recv_raw() == ack(19)
    await wire.send({"action": "close_stdin", "seq": 20})
    _, others = await collect(wire)
    assert others == ['{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":0}']


@pytest.mark.parametrize("frame", ["stdin", "close_stdin"])
@pytest.mark.parametrize("seq", [0, -1, 1.5, True, "1", None])
async def test_bad_seq_gets_the_error_pair_and_is_dropped(local: LocalServer, frame: str, seq: object) -> None:
    wire = await create(local)
    await start(wire, ECHO)
    bad = {"event": "stdin", "data": "bad\n"} if frame == "stdin" else {"action": "close_stdin"}
    await wire.send({**bad, "seq": seq})
    assert await wire.recv_raw() == st("SANDBOX_STDIN_ERROR")
    assert await wire.recv_raw() == err("Invalid stdin message format. 'seq' must be a positive integer.")
    await wire.send(stdin("good\n", 1))
    await wire.send({"action": "close_stdin", "seq": 2})
    out, _ = await collect(wire)
    assert out == "good\n"


async def test_reconnect_without_stdin_seq_gets_no_ack(local: LocalServer) -> None:
    first = await create(local)
    await start(first, ECHO)
    await first.send(stdin("a\n", 1))
    _, last_seq = await read_stdout_until(first, "a\n")
    first.ws.transport.abort()
    second = await reattach(local, first)
    await second.send({"action": "reconnect", "last_seq": last_seq})
    assert await second.recv_raw() == EXEC_RUNNING
    await second.send({"action": "close_stdin", "seq": 2})
    out, others = await collect(second)
    assert (out, others) == ("", ['{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":0}'])


async def test_reconnect_with_no_exec_acks_zero_then_done(local: LocalServer) -> None:
    wire = await create(local)
    await wire.send({"action": "reconnect", "stdin_seq": True})
    assert await wire.recv_raw() == ack(0)
    assert await wire.recv_raw() == st("SANDBOX_EXECUTION_DONE")


async def test_upstream_mode_has_no_stdin_seq(tmp_path: Path) -> None:
    async with LocalServer(port=0, state_dir=tmp_path, protocol="upstream") as server:
        first = await create(server)  # RUNNING without an extensions list
        await start(first, ECHO)
        # The key is ignored: nothing is deduplicated, a bad value is no error, nothing is acked.
        seqs: list[object] = [1, 1, "x", *range(2, 18)]
        for seq in seqs:
            await first.send(stdin(f"{seq}\n", seq))
        text, _ = await read_stdout_until(first, "17\n")  # no ack or error frame in between
        assert text == "".join(f"{seq}\n" for seq in seqs)
        first.ws.transport.abort()
        second = await reattach(server, first)
        await second.send({"action": "reconnect", "stdin_seq": True})
        assert await second.recv_raw() == EXEC_RUNNING
        await second.send({"action": "kill_process"})
        frames = [await second.recv_raw() for _ in range(2)]
        assert sorted(frames) == sorted([st("SANDBOX_EXECUTION_FORCE_KILLED"), st("SANDBOX_EXECUTION_DONE")])


async def test_stop_finishes_with_stdin_queued_for_a_process_that_never_reads(tmp_path: Path) -> None:
    async with asyncio.timeout(TIMEOUT):
        server = LocalServer(port=0, state_dir=tmp_path)
        await server.start()
        try:
            wire = await create(server)
            await start(wire, "import time\ntime.sleep(1000)")
            for seq in range(1, 4):  # more than the pipe and the transport take, less than an ack's worth
                await wire.send(stdin("z" * 80_000, seq))
            await barrier(wire)
            sandbox = server.manager.get(wire.sandbox_id)
            assert sandbox is not None and sandbox.execution is not None
            execution = sandbox.execution
            writer = execution._stdin_writer
            assert writer is not None and not writer.done()  # the process never reads: its stdin waits
        finally:
            await server.stop()
        assert execution.finished.is_set()
        assert writer.done()


# -- exec_ref: the exec a RUNNING is about ----------------------------------------


async def test_exec_ref_is_echoed_on_running_and_on_the_reconnect_reply(local: LocalServer) -> None:
    first = await create(local)
    await first.send({"language": "python", "code": ECHO, "ref": "mine-1"})
    ran = '{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING","ref":"mine-1"}'
    assert await first.recv_raw() == (ran if local.protocol == "extended" else EXEC_RUNNING)
    first.ws.transport.abort()
    second = await reattach(local, first)
    await second.send({"action": "reconnect"})
    # The reply names whose stream it resumes, so a client whose own exec was lost does not take it.
    assert await second.recv_raw() == (ran if local.protocol == "extended" else EXEC_RUNNING)
    await second.send({"action": "kill_process"})
