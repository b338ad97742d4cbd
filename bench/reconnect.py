"""Reconnect latency: how long from a cut connection to a sandbox that runs again.

A :class:`~sandbox_server.LocalServer` (the reference server, so the attach
is the real one) on its own thread, reached through the test suite's
``CuttingProxy``, which aborts every connection on ``cut()`` like a network
drop. Our client (``enable_auto_reconnect=True``) notices the loss, opens a
new WebSocket, attaches and is ``RUNNING`` again: that is one reconnect,
timed from the cut to the ``Reconnected`` event (seen through the
``sandbox`` logger's "reconnected" record, so no polling delay is added).

The baseline is what any client pays at least: a fresh raw ``websockets``
connection through the same proxy to ``/attach/{id}`` of another sandbox,
up to its ``SANDBOX_RUNNING`` (TCP connect, WebSocket handshake, attach).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from . import wire
from .clients import make

_ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def server_and_proxy() -> Iterator[tuple[str, Any]]:
    """The reference server and a cutting proxy in front of it; yields (server url, proxy)."""
    tests = str(_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from _support import CuttingProxy, ServerThread

    with ServerThread(isolation="none") as server, CuttingProxy(server.url) as proxy:
        yield server.url, proxy


class _ReconnectedHandler(logging.Handler):
    """Sets ``flag`` when the driver logs a completed reconnect (on the reader's own task)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.flag: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("reconnected") and self.flag is not None:
            self.flag.set()


def ours(kind_name: str, proxy: Any, count: int) -> list[float]:
    """Seconds from each of ``count`` cuts to our sandbox running again."""
    kind = make(kind_name)
    handler = _ReconnectedHandler()
    log = logging.getLogger("sandbox")
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    async def main() -> list[float]:
        latencies = []
        async with kind.scope():
            sandbox = await kind.open(proxy.url, enable_auto_reconnect=True)
            for index in range(count + 2):  # two warm-up reconnects
                handler.flag = anyio.Event()
                start = time.perf_counter()
                proxy.cut()
                with anyio.fail_after(30):
                    await handler.flag.wait()
                if index >= 2:
                    latencies.append(time.perf_counter() - start)
            assert sandbox.reconnects == count + 2
            await kind.close(sandbox)
        return latencies

    try:
        return anyio.run(main, backend=kind.backend)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


def raw_attach(server_url: str, proxy: Any, count: int) -> list[float]:
    """Seconds for each of ``count`` fresh raw websockets attaches through the proxy."""
    from websockets.asyncio.client import connect

    base = server_url.replace("http", "ws", 1)
    via = proxy.url.replace("http", "ws", 1)

    async def until_running(ws: Any) -> dict[str, Any]:
        ids: dict[str, Any] = {}
        while True:
            obj = json.loads(await ws.recv())
            if obj.get("event") == "sandbox_id":
                ids = obj
            if obj.get("status") == wire.RUNNING:
                return ids

    async def main() -> list[float]:
        async with connect(base + "/create") as ws:
            await ws.send(wire.CREATE_INIT)
            ids = await until_running(ws)
        path = f"/attach/{ids['sandbox_id']}?sandbox_token={ids['sandbox_token']}"
        latencies = []
        for index in range(count + 2):
            start = time.perf_counter()
            ws = await connect(via + path)
            await until_running(ws)
            if index >= 2:
                latencies.append(time.perf_counter() - start)
            await ws.close()
        return latencies

    return anyio.run(main, backend="asyncio")
