"""``detached_timeout``: an exec whose client went away does not run forever.

Upstream, a running exec blocks idle expiry, so a never-ending exec whose
client disconnected ran for ever. With ``detached_timeout`` the server kills
the processes of a sandbox that has had no client attached for that long;
the idle timeout then applies as usual.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable

import pytest
from server._server_wire import Wire, pid_alive, st

from sandbox_server import LocalServer
from sandbox_server._cli import add_arguments

pytestmark = pytest.mark.anyio

FOREVER = "sleep 100000 & echo $!; wait"


async def eventually(condition: Callable[[], bool], limit: float = 15.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds, failing after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not condition():
        assert loop.time() < end, f"{what}: not met within {limit} s"
        await asyncio.sleep(0.02)


async def start_forever(url: str, init: str) -> tuple[Wire, int]:
    wire = await Wire.create(url, "extended", init)
    await wire.send({"language": "bash", "code": FOREVER})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    frame = await wire.frame()
    assert frame["event"] == "stdout", frame
    return wire, int(frame["data"])


async def test_a_detached_exec_is_killed_then_the_idle_rules_apply() -> None:
    async with LocalServer(port=0, isolation="none", detached_timeout=0.5, idle_sweep_interval=0.05) as server:
        gone, gone_pid = await start_forever(server.url, '{"idle_timeout":1}')
        kept, kept_pid = await start_forever(server.url, '{"idle_timeout":1}')
        await gone.close()  # its client goes away; the other stays attached
        await eventually(lambda: not pid_alive(gone_pid), what="the detached exec killed")
        assert pid_alive(kept_pid), "an attached client's exec is left alone"
        # Killed, the exec no longer blocks idle expiry: the sandbox expires as an idle one.
        await eventually(lambda: server.manager.get(gone.sandbox_id) is None, what="idle expiry after the kill")
        assert server.manager.get(kept.sandbox_id) is not None
        await kept.send({"action": "kill_process"})
        await eventually(lambda: not pid_alive(kept_pid), what="kill_process")


async def test_the_clock_runs_only_while_detached() -> None:
    """Driven by hand (the sweep's limit is an hour here): attached time does not count, detached time does."""
    async with LocalServer(port=0, isolation="none", detached_timeout=3600) as server:
        manager = server.manager
        wire, pid = await start_forever(server.url, '{"idle_timeout":60}')
        manager._kill_detached(0.0, 10.0)
        manager._kill_detached(1000.0, 10.0)  # attached all along: nothing happens
        assert pid_alive(pid)
        await wire.close()
        sandbox = manager.get(wire.sandbox_id)
        assert sandbox is not None
        await eventually(lambda: sandbox.observer is None, what="the server noticing the close")
        manager._kill_detached(2000.0, 10.0)  # detached from here on
        manager._kill_detached(2009.0, 10.0)
        assert pid_alive(pid)
        manager._kill_detached(2010.0, 10.0)
        await eventually(lambda: not pid_alive(pid), what="the kill")


def test_the_cli_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).detached_timeout is None
    assert parser.parse_args(["--detached-timeout", "2.5"]).detached_timeout == 2.5


def test_the_embedded_server_of_the_cli_bounds_detached_work() -> None:
    from sandbox_cli import _cli

    assert 0 < _cli.EMBEDDED_DETACHED_TIMEOUT <= 300


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError, match="detached_timeout"):
        LocalServer(detached_timeout=0)
