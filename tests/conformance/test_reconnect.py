"""Auto-reconnect through a proxy that cuts every connection on command."""

from __future__ import annotations

import re

import anyio
import pytest
from _support import Client, CuttingProxy, ServerThread, wait_until

from sandbox_proto import ReconnectPolicy, SandboxConnectionError

pytestmark = pytest.mark.anyio

PROGRAM = """
import time
for i in range(2000):
    print(f"line {i}", flush=True)
    time.sleep(0.0025)
print("got " + input(), flush=True)
"""


async def test_twenty_cuts_lose_and_duplicate_nothing(client: Client, server: ServerThread) -> None:
    with CuttingProxy(server.url) as proxy:
        sandbox = await client.create(proxy.url, enable_auto_reconnect=True)
        try:
            process = await sandbox.exec("python", PROGRAM)
            lines: list[str] = []
            collected = anyio.Event()

            async def collect() -> None:
                async for line in process.stdout:
                    lines.append(line)
                collected.set()

            upstream = server.protocol == "upstream"  # type: ignore[attr-defined]
            async with anyio.create_task_group() as group:
                group.start_soon(collect)
                for cut in range(20):
                    seen = len(lines)
                    await wait_until(lambda seen=seen: len(lines) > seen + 20 or collected.is_set(), 30, "output")
                    proxy.cut()
                    await wait_until(lambda cut=cut: sandbox.reconnects > cut, 30, f"reconnect {cut + 1}")
                if upstream:
                    # Lines may be lost without seq, so there is no count to wait for.
                    await process.write_to_stdin("during the cut\n")
                else:
                    # A cut with stdin written while the client is reconnecting.
                    await wait_until(lambda: len(lines) >= 2000, 60, "all numbered lines")
                    proxy.cut(hold=True)
                    await wait_until(lambda: sandbox.state == "reconnecting", 10, "the client to notice the cut")
                    await process.write_to_stdin("during the cut\n")
                    proxy.release()
                await process.wait(timeout=60)
        finally:
            await sandbox.kill()
    numbered = [line for line in lines if line.startswith("line ")]
    if upstream:
        # Without the seq extension nothing can be promised, but the loss must be flagged.
        assert process.output_may_be_incomplete
        # A lost frame can cut a line in two (frames are not lines); whole lines stay in order.
        numbers = [int(match[1]) for line in numbered if (match := re.fullmatch(r"line (\d+)\n", line))]
        assert numbers == sorted(set(numbers))  # in order, none twice
        return
    assert numbered == [f"line {i}\n" for i in range(2000)]
    assert lines[-1] == "got during the cut\n"
    assert sandbox.reconnects == 21
    assert not process.output_may_be_incomplete


async def test_gives_up_when_the_server_is_gone(client: Client, server: ServerThread) -> None:
    proxy = CuttingProxy(server.url)
    with proxy:
        sandbox = await client.create(
            proxy.url,
            enable_auto_reconnect=True,
            reconnect_policy=ReconnectPolicy(initial_delay=0.05, max_delay=0.2, deadline=1.5),
        )
        process = await sandbox.exec("bash", "sleep 30")
        proxy.stop_accepting()
        proxy.cut()
        with pytest.raises(SandboxConnectionError):
            await process.wait(timeout=10)
        assert isinstance(await sandbox.wait_closed(timeout=10), SandboxConnectionError)
