"""One measurement = one fresh event loop (or one fresh process, where memory is measured).

Every function returns plain numbers; repeating, pairing with the baseline
and taking medians is the caller's job (``__main__``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from . import server, wire
from .clients import Ours, OursSync, make

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident memory of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def throughput(kind_name: str, url: str, count: int, size: int) -> float:
    """Seconds from the exec request to the last byte of ``count`` frames of ``size``."""
    kind = make(kind_name)
    if isinstance(kind, OursSync):
        return _sync_throughput(kind, url, count, size)

    async def main() -> float:
        async with kind.scope():
            conn = await kind.open(url)
            await kind.collect(conn, 200, size)  # warm-up: first-use costs out of the timing
            start = time.perf_counter()
            got = await kind.collect(conn, count, size)
            elapsed = time.perf_counter() - start
            await kind.close(conn)
        if got != count * size:
            raise AssertionError(f"{kind_name}: received {got} characters, expected {count * size}")
        return elapsed

    return anyio.run(main, backend=kind.backend)


def round_trips(kind_name: str, url: str, count: int) -> list[float]:
    """Latency of each of ``count`` sequential execs with no output, in seconds."""
    kind = make(kind_name)
    if isinstance(kind, OursSync):
        return _sync_round_trips(kind, url, count)

    async def main() -> list[float]:
        latencies = []
        async with kind.scope():
            conn = await kind.open(url)
            for _ in range(50):
                await kind.collect(conn, 0, 0)
            clock = time.perf_counter
            for _ in range(count):
                start = clock()
                await kind.collect(conn, 0, 0)
                latencies.append(clock() - start)
            await kind.close(conn)
        return latencies

    return anyio.run(main, backend=kind.backend)


def _sync_throughput(kind: OursSync, url: str, count: int, size: int) -> float:
    """As :func:`throughput`, from a plain thread with no event loop of its own (as a script runs)."""
    conn = kind.open_sync(url)
    try:
        kind.collect_sync(conn, 200, size)
        start = time.perf_counter()
        got = kind.collect_sync(conn, count, size)
        elapsed = time.perf_counter() - start
    finally:
        conn.kill()
    if got != count * size:
        raise AssertionError(f"sync: received {got} characters, expected {count * size}")
    return elapsed


def _sync_round_trips(kind: OursSync, url: str, count: int) -> list[float]:
    """As :func:`round_trips`: each exec is three blocking calls (exec, read_all, wait)."""
    conn = kind.open_sync(url)
    latencies = []
    try:
        for _ in range(50):
            kind.collect_sync(conn, 0, 0)
        clock = time.perf_counter
        for _ in range(count):
            start = clock()
            kind.collect_sync(conn, 0, 0)
            latencies.append(clock() - start)
    finally:
        conn.kill()
    return latencies


def core(count: int, size: int) -> tuple[float, float]:
    """Seconds for ``ClientProtocol.receive`` + ``events()`` and for bare ``json.loads`` on the same frames."""
    from sandbox_proto import ClientProtocol, InitRequest

    frames = [wire.stdout_frame(size)] * count
    protocol = ClientProtocol("http://127.0.0.1:1", init=InitRequest())
    protocol.connection_opened([])
    for text in (wire.status("SANDBOX_CREATING"), wire.sandbox_id_frame(), wire.status(wire.RUNNING)):
        protocol.receive(text)
    protocol.exec("python", "")
    protocol.receive(wire.status(wire.EXEC_RUNNING))
    protocol.events()
    receive, events, loads = protocol.receive, protocol.events, json.loads
    clock = time.perf_counter

    start = clock()
    for text in frames:
        loads(text)
    bare = clock() - start

    start = clock()
    for text in frames:
        receive(text)
        events()
    ours = clock() - start
    return ours, bare


# -- in a child process: RSS deltas are only honest in a fresh heap ---------


def scale(kind_name: str, url: str, count: int) -> dict[str, float]:
    """Open ``count`` connections at once; time to open all, RSS per idle connection."""
    from .blaster import raise_fd_limit

    raise_fd_limit()
    kind = make(kind_name)

    async def main() -> dict[str, float]:
        async with kind.scope():
            for conn in [await kind.open(url) for _ in range(5)]:  # warm-up: imports, first-use caches
                await kind.close(conn)
            gc.collect()
            before = rss()
            conns: list[Any] = []

            async def open_one() -> None:
                conns.append(await kind.open(url))

            start = time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(count):
                    group.start_soon(open_one)
            elapsed = time.perf_counter() - start
            await anyio.sleep(0.5)  # let handshake leftovers settle
            gc.collect()
            per_conn = (rss() - before) / count
            async with anyio.create_task_group() as group:
                for conn in conns:
                    group.start_soon(kind.close, conn)
        return {"seconds": elapsed, "rss_per_conn": per_conn}

    return anyio.run(main, backend=kind.backend)


def bounded(kind_name: str, url: str, total: int, pause: float, buffer: int) -> dict[str, float]:
    """Stop reading for ``pause`` s while ``total`` bytes are sent; RSS growth and bytes received."""
    kind = make(kind_name)
    assert isinstance(kind, Ours)
    size = 1024
    count = total // size

    async def main() -> dict[str, float]:
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss())
                await anyio.sleep(0.005)

        async with kind.scope():
            conn = await kind.open(url, stream_buffer_size=buffer)
            await kind.collect(conn, 2000, size)  # warm-up
            gc.collect()
            before = peak = rss()
            async with anyio.create_task_group() as group:
                group.start_soon(sample)
                process = await kind.exec(conn, count, size)
                await anyio.sleep(pause)
                paused = rss() - before
                # Private, read only here: shows the buffer really filled while paused.
                buffered = process._budget.used
                received = 0
                while chunk := await process.stdout.read():
                    received += len(chunk)
                await process.wait()
                group.cancel_scope.cancel()
            await kind.close(conn)
        return {
            "peak_growth": peak - before,
            "paused_growth": paused,
            "buffered": buffered,
            "received": received,
            "expected": count * size,
        }

    return anyio.run(main, backend=kind.backend)


_CHILD: dict[str, Callable[..., dict[str, float]]] = {"scale": scale, "bounded": bounded, "hold": server.hold}


def in_child(name: str, *args: Any) -> dict[str, float]:
    """Run ``name(*args)`` in a fresh interpreter and return its result."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "bench.measure", name, json.dumps(args)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,  # 10,000 sandboxes on the slowest transport take a minute or two
    )
    if out.returncode:
        raise RuntimeError(f"{name}{args} failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


if __name__ == "__main__":
    print(json.dumps(_CHILD[sys.argv[1]](*json.loads(sys.argv[2]))))  # noqa: T201 - read by in_child
