"""Auto-reconnect through a proxy that cuts every connection on command."""

from __future__ import annotations

import asyncio

import pytest
from _support import CuttingProxy, ServerThread

from sandbox_asyncio import ReconnectPolicy, Sandbox, SandboxConnectionError

pytestmark = pytest.mark.anyio

PROGRAM = """
import time
for i in range(2000):
    print(f"line {i}", flush=True)
    time.sleep(0.0025)
print("got " + input(), flush=True)
"""


async def _wait_until(predicate: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_twenty_cuts_lose_and_duplicate_nothing(server: ServerThread) -> None:
    with CuttingProxy(server.url) as proxy:
        sandbox = await Sandbox.create(proxy.url, enable_auto_reconnect=True)
        try:
            process = await sandbox.exec("python", PROGRAM)
            lines: list[str] = []

            async def collect() -> None:
                async for line in process.stdout:
                    lines.append(line)

            collector = asyncio.create_task(collect())
            for cut in range(20):
                seen = len(lines)
                await _wait_until(lambda seen=seen: len(lines) > seen + 20 or collector.done(), 30, "more output")
                proxy.cut()
                await _wait_until(lambda cut=cut: sandbox.reconnects > cut, 30, f"reconnect {cut + 1}")
            upstream = server.protocol == "upstream"  # type: ignore[attr-defined]
            if upstream:
                # Lines may be lost without seq, so there is no count to wait for.
                await process.write_to_stdin("during the cut\n")
            else:
                # A cut with stdin written while the client is reconnecting.
                await _wait_until(lambda: len(lines) >= 2000, 60, "all numbered lines")
                proxy.cut(hold=True)
                await _wait_until(lambda: sandbox.state == "reconnecting", 10, "the client to notice the cut")
                await process.write_to_stdin("during the cut\n")
                proxy.release()
            await process.wait(timeout=60)
            await collector
        finally:
            await sandbox.kill()
    numbered = [line for line in lines if line.startswith("line ")]
    if upstream:
        # Without the seq extension nothing can be promised, but the loss must be flagged.
        assert process.output_may_be_incomplete
        numbers = [int(line.split()[1]) for line in numbered]
        assert numbers == sorted(set(numbers))  # in order, none twice
        return
    assert numbered == [f"line {i}\n" for i in range(2000)]
    assert lines[-1] == "got during the cut\n"
    assert sandbox.reconnects == 21
    assert not process.output_may_be_incomplete


async def test_gives_up_when_the_server_is_gone(server: ServerThread) -> None:
    proxy = CuttingProxy(server.url)
    with proxy:
        sandbox = await Sandbox.create(
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
