"""What an idle attached sandbox costs the server (issue 15), and the batched output path.

No timings here (benchmarks are ``python -m bench``): these check the shape
of the fixes, that nothing per sandbox is kept that need not be, and that
the output written in batches arrives whole and in order.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from sandbox_server import LocalServer
from sandbox_server._output import OutputLog, Signal

from ._server_wire import Wire

pytestmark = pytest.mark.anyio


async def test_a_signal_wakes_the_waiters_of_the_time_and_keeps_nothing_between_fires() -> None:
    signal = Signal()
    signal.fire()  # nobody waits: nothing to wake, nothing kept
    assert signal._event is None
    woken: list[int] = []

    async def waiter(index: int) -> None:
        await signal.wait()
        woken.append(index)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    signal.fire()
    await asyncio.gather(*tasks)
    assert sorted(woken) == [0, 1, 2]
    assert signal._event is None
    late = asyncio.create_task(signal.wait())
    await asyncio.sleep(0.01)
    assert not late.done(), "a fire before the wait does not count for it (edge-triggered)"
    signal.fire()
    await late


async def test_extend_numbers_like_append_and_wakes_once() -> None:
    log = OutputLog(limit=10_000)
    log.append("stdout", "a", 1)
    waiter = asyncio.create_task(log.changed.wait())
    await asyncio.sleep(0)
    log.extend("stdout", [("b", 1), ("c", 1)])
    await waiter
    assert [(c.seq, c.data) for c in log.frames_after(0, log.last_seq, 10)] == [(1, "a"), (2, "b"), (3, "c")]
    assert log.undelivered_bytes == 3


async def test_one_write_watch_for_all_connections_and_no_handshake_kept() -> None:
    async with LocalServer(port=0, isolation="none") as server:
        wires = [await Wire.create(server.url, "upstream") for _ in range(5)]
        watches = [t for t in asyncio.all_tasks() if "_watch_writes" in repr(t.get_coro())]
        assert len(watches) == 1
        connections = list(server._connections.values())
        assert len(connections) == 5
        assert all(not c.ws.request.headers for c in connections if c.ws.request is not None)
        for wire in wires:
            await wire.ws.close()


async def test_deflate_holds_no_state_between_messages_and_output_arrives_whole() -> None:
    async with LocalServer(port=0, isolation="none") as server:
        wire = await Wire.create(server.url, "upstream")  # websockets' client offers deflate
        assert wire.ws.response is not None
        negotiated = wire.ws.response.headers["Sec-WebSocket-Extensions"]
        assert "permessage-deflate" in negotiated
        assert "server_no_context_takeover" in negotiated
        assert "client_no_context_takeover" in negotiated
        # Many frames, sent in batches of several per socket write: every line, in order.
        await wire.send({"language": "python", "code": "for i in range(5000): print(f'line {i:05d}')"})
        stdout = ""
        while True:
            frame = json.loads(await wire.recv_raw())
            if frame.get("event") == "stdout":
                stdout += frame["data"]
            elif frame.get("status") == "SANDBOX_EXECUTION_DONE":
                break
        assert stdout == "".join(f"line {i:05d}\n" for i in range(5000))
        await wire.ws.close()
