"""The clients under test, behind one small interface.

``raw-*`` are the ceilings: the shortest loop a Python program can write on
each library (connect, send, ``recv``, ``json.loads``, append). The others are
our ``Sandbox`` on each transport. Timed loops call the libraries directly;
anyio is only the harness around them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from . import wire

MAX_SIZE = 16 * 2**20  # as our transports, so the raw loops run with the same limits
#: Opening handshake timeout of the raw loops: our clients' default (60 s), not websockets' 10 s,
#: which the last of 10,000 concurrent handshakes exceeds while the client's CPU works through them.
OPEN_TIMEOUT = 60.0


class Kind:
    """One client under test; ``backend`` is the anyio backend it runs on."""

    name = ""
    backend = "asyncio"
    ours = False

    @asynccontextmanager
    async def scope(self) -> AsyncIterator[None]:
        """Resources shared by every connection of one run (a nursery, a session)."""
        yield

    async def open(self, url: str, **options: Any) -> Any:
        raise NotImplementedError

    async def collect(self, conn: Any, count: int, size: int) -> int:
        """One exec that streams ``count`` frames of ``size``; returns the characters received."""
        raise NotImplementedError

    async def close(self, conn: Any) -> None:
        raise NotImplementedError


def _is_done(obj: dict[str, Any]) -> bool:
    return obj.get("status") == wire.EXEC_DONE


# -- raw loops ------------------------------------------------------------


class TrioKind(Kind):
    backend = "trio"

    @asynccontextmanager
    async def scope(self) -> AsyncIterator[None]:
        import trio

        async with trio.open_nursery() as self.nursery:
            yield


class RawWebsockets(Kind):
    name = "raw websockets"

    async def open(self, url: str, **options: Any) -> Any:
        from websockets.asyncio.client import connect

        uri = url.replace("http", "ws", 1) + "/create"
        return await self.created(await connect(uri, max_size=MAX_SIZE, max_queue=16, open_timeout=OPEN_TIMEOUT))

    @staticmethod
    async def created(ws: Any) -> Any:
        await ws.send(wire.CREATE_INIT)
        while json.loads(await ws.recv()).get("status") != wire.RUNNING:
            pass
        return ws

    async def collect(self, conn: Any, count: int, size: int) -> int:
        await conn.send(wire.exec_request(count, size))
        recv, loads = conn.recv, json.loads
        parts: list[str] = []
        while True:
            obj = loads(await recv())
            if obj["event"] == "stdout":
                parts.append(obj["data"])
            elif _is_done(obj):
                return len("".join(parts))

    async def close(self, conn: Any) -> None:
        await conn.close()


class RawAiohttp(Kind):
    name = "raw aiohttp"

    @asynccontextmanager
    async def scope(self) -> AsyncIterator[None]:
        import aiohttp

        # limit=0: the default pool of 100 would make connection 101 wait forever.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as self.session:
            yield

    async def open(self, url: str, **options: Any) -> Any:
        ws = await self.session.ws_connect(url + "/create", max_msg_size=MAX_SIZE)
        await ws.send_str(wire.CREATE_INIT)
        while json.loads((await ws.receive()).data).get("status") != wire.RUNNING:
            pass
        return ws

    async def collect(self, conn: Any, count: int, size: int) -> int:
        await conn.send_str(wire.exec_request(count, size))
        receive, loads = conn.receive, json.loads
        parts: list[str] = []
        while True:
            obj = loads((await receive()).data)
            if obj["event"] == "stdout":
                parts.append(obj["data"])
            elif _is_done(obj):
                return len("".join(parts))

    async def close(self, conn: Any) -> None:
        await conn.close()


class RawWebsocketsTrio(TrioKind, RawWebsockets):
    name = "raw websockets-trio"

    async def open(self, url: str, **options: Any) -> Any:
        from websockets.trio.client import connect

        uri = url.replace("http", "ws", 1) + "/create"
        connection = connect(uri, max_size=MAX_SIZE, max_queue=16, open_timeout=OPEN_TIMEOUT)
        return await self.created(await connection.connect(self.nursery))

    async def close(self, conn: Any) -> None:
        await conn.aclose()


class RawTrioWebsocket(TrioKind):
    name = "raw trio-websocket"

    async def open(self, url: str, **options: Any) -> Any:
        from trio_websocket import connect_websocket_url

        ws = await connect_websocket_url(
            self.nursery, url.replace("http", "ws", 1) + "/create", max_message_size=MAX_SIZE, message_queue_size=16
        )
        await ws.send_message(wire.CREATE_INIT)
        while json.loads(await ws.get_message()).get("status") != wire.RUNNING:
            pass
        return ws

    async def collect(self, conn: Any, count: int, size: int) -> int:
        await conn.send_message(wire.exec_request(count, size))
        get, loads = conn.get_message, json.loads
        parts: list[str] = []
        while True:
            obj = loads(await get())
            if obj["event"] == "stdout":
                parts.append(obj["data"])
            elif _is_done(obj):
                return len("".join(parts))

    async def close(self, conn: Any) -> None:
        await conn.aclose()


# -- our client -------------------------------------------------------------


class Ours(Kind):
    ours = True
    transport = "websockets"
    #: ``exec``'s timeout (its default); ``None`` shows what the cancel scope behind it costs.
    exec_timeout: float | None = 30.0

    def __init__(self) -> None:
        self.name = self.transport

    async def open(self, url: str, **options: Any) -> Any:
        from sandbox_asyncio import Sandbox

        return await Sandbox.create(url, transport=self.transport, **options)

    async def exec(self, conn: Any, count: int, size: int) -> Any:
        return await conn.exec("python", wire.exec_code(count, size), timeout=self.exec_timeout)

    async def collect(self, conn: Any, count: int, size: int) -> int:
        process = await self.exec(conn, count, size)
        out = await process.stdout.read_all()
        await process.wait()
        return len(out)

    async def close(self, conn: Any) -> None:
        await conn.kill()


class OursAiohttp(Ours):
    transport = "aiohttp"


class OursTrio(TrioKind, Ours):
    transport = "trio"
    library = "websockets"

    async def open(self, url: str, **options: Any) -> Any:
        from sandbox_trio import Sandbox

        return await Sandbox.create(url, nursery=self.nursery, transport=self.library, **options)


class OursTrioWebsocket(OursTrio):
    transport = "trio-websocket"
    library = "trio-websocket"


class OursSync(Kind):
    """``sandbox_sync``: blocking calls, each crossing to its background loop. Not async: see ``measure``."""

    ours = True
    name = "sync"

    def open_sync(self, url: str, **options: Any) -> Any:
        from sandbox_sync import Sandbox

        return Sandbox.create(url, **options)

    def collect_sync(self, conn: Any, count: int, size: int) -> int:
        process = conn.exec("python", wire.exec_code(count, size), timeout=Ours.exec_timeout)
        out = process.stdout.read_all()
        process.wait()
        return len(out)


KINDS: dict[str, type[Kind]] = {
    "raw websockets": RawWebsockets,
    "raw aiohttp": RawAiohttp,
    "raw websockets-trio": RawWebsocketsTrio,
    "raw trio-websocket": RawTrioWebsocket,
    "websockets": Ours,
    "aiohttp": OursAiohttp,
    "trio": OursTrio,
    "trio-websocket": OursTrioWebsocket,
    "sync": OursSync,
}
#: The library ceiling of each of our transports, to split our cost from the library's.
LIBRARY_OF = {
    "websockets": "raw websockets",
    "aiohttp": "raw aiohttp",
    "trio": "raw websockets-trio",
    "trio-websocket": "raw trio-websocket",
}


def make(name: str) -> Kind:
    return KINDS[name]()
