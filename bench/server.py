"""The local server's own speed (issue 15): idle sandboxes, exec round trip, stdout throughput.

The server runs as ``python -m sandbox_server`` in a child process (off the
client's GIL), one fresh process per measurement where its memory is
measured. The client is a raw ``websockets`` loop, so the numbers are the
server's, not our client's. Every measurement has a baseline taken in the
same run, alternating with it:

* idle sandboxes: the blaster (``bench/blaster.py``, a bare ``websockets``
  server) holding as many connections, each past the same create handshake;
* round trip: ``subprocess.run(["bash", "-c", "true"])`` from this process;
* throughput: the same producer started by this process, its stdout pipe
  read directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import wire

_ROOT = Path(__file__).resolve().parent.parent
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: Create init of the idle benchmark: no expiry while 10,000 of them are opened.
IDLE_INIT = json.dumps({"idle_timeout": 3600})
#: Reads of the direct baseline: what asyncio's pipe transport (the server's) reads at most.
PIPE_READ = 256 * 1024
WRITE = 64 * 1024
#: Sandboxes being opened at once by the idle benchmark.
OPENING = 200
#: Seconds over which the idle benchmark reads the CPU the server spends holding its sandboxes.
IDLE_CPU_WINDOW = 3.0
_TICKS = os.sysconf("SC_CLK_TCK")


class ServerDidNotStart(RuntimeError):
    """``python -m sandbox_server`` exited before printing its URL (e.g. no working bubblewrap)."""


def rss_of(pid: int) -> int:
    """Resident memory of process ``pid`` now, in bytes (Linux)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@contextmanager
def local_server(*options: str, profile: str | None = None) -> Iterator[tuple[str, int]]:
    """``python -m sandbox_server --port 0 OPTIONS`` in a child process: its URL and pid.

    With ``profile``, the server runs under cProfile (see :func:`_profiled`)
    and writes its stats there when it exits (SIGTERM stops it cleanly).
    """
    runner = ["-m", "bench.server", profile] if profile else ["-m", "sandbox_server"]
    process = subprocess.Popen(
        [sys.executable, *runner, "--port", "0", "--log-level", "ERROR", *options],
        cwd=_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise ServerDidNotStart(f"sandbox_server {' '.join(options)} did not start: {line!r}")
        yield line.split()[-1], process.pid
    finally:
        process.terminate()
        # Shutdown removes every sandbox's directories: 10,000 take a while.
        process.wait(timeout=120)


# -- idle sandboxes (in a child process: 10,000 sockets) --------------------


def hold(url: str, pid: int, count: int) -> dict[str, float]:
    """Open ``count`` sandboxes on the server ``pid``: seconds to open all, its RSS per sandbox, its idle CPU.

    Raw ``websockets`` connections past ``SANDBOX_RUNNING``, kept open (attached)
    while the server's RSS and then its CPU use over :data:`IDLE_CPU_WINDOW` are read.
    """
    from websockets.asyncio.client import ClientConnection, connect

    from .blaster import raise_fd_limit

    raise_fd_limit()
    uri = url.replace("http", "ws", 1) + "/create"

    async def open_one() -> ClientConnection:
        # No client pings: the server's own keepalive is what is measured.
        ws = await connect(uri, ping_interval=None, open_timeout=120)
        await ws.send(IDLE_INIT)
        while json.loads(await ws.recv()).get("status") != wire.RUNNING:
            pass
        return ws

    async def main() -> dict[str, float]:
        # Bounded concurrency: all at once, the last handshakes would wait on this client's
        # CPU past the server's 10 s open_timeout, and what is measured here is the server.
        slots = asyncio.Semaphore(OPENING)

        async def open_bounded() -> ClientConnection:
            async with slots:
                return await open_one()

        for ws in [await open_one() for _ in range(5)]:  # warm-up: first-use costs out of the numbers
            await ws.close()
        await asyncio.sleep(0.5)
        before = rss_of(pid)
        start = time.perf_counter()
        conns = await asyncio.gather(*(open_bounded() for _ in range(count)))
        elapsed = time.perf_counter() - start
        await asyncio.sleep(1.0)  # let handshake leftovers settle on the other side
        per_conn = (rss_of(pid) - before) / count
        cpu = cpu_of(pid)
        await asyncio.sleep(IDLE_CPU_WINDOW)
        idle_cpu = (cpu_of(pid) - cpu) / IDLE_CPU_WINDOW
        await asyncio.gather(*(ws.close() for ws in conns))
        return {"seconds": elapsed, "rss_per_conn": per_conn, "idle_cpu": idle_cpu}

    return asyncio.run(main())


# -- round trip and throughput (in this process) ------------------------------


def producer_code(total: int, lines: bool) -> str:
    """Python that writes ``total`` bytes of stdout: 64 KiB writes, or 80-byte ``print()`` lines."""
    if lines:
        return f"for _ in range({total // 80}): print({'x' * 79!r})\n"
    full, rest = divmod(total, WRITE)
    lines_of_code = ["import sys", "w = sys.stdout.buffer.write", f"b = b'x' * {WRITE}"]
    lines_of_code += [f"for _ in range({full}): w(b)", f"w(b[:{rest}])"]
    return "\n".join(lines_of_code) + "\n"


def expected_bytes(total: int, lines: bool) -> int:
    return total // 80 * 80 if lines else total


async def _created(url: str) -> Any:
    from websockets.asyncio.client import connect

    # websockets' default per-message deflate, as most clients (ours too) ask for it.
    ws = await connect(url.replace("http", "ws", 1) + "/create", max_size=None, ping_interval=None)
    await ws.send(wire.CREATE_INIT)
    while json.loads(await ws.recv()).get("status") != wire.RUNNING:
        pass
    return ws


async def _exec(ws: Any, language: str, code: str) -> int:
    """One exec through the server; characters of stdout received."""
    await ws.send(json.dumps({"language": language, "code": code}))
    received = 0
    loads = json.loads
    while True:
        raw = await ws.recv()
        obj = loads(raw)
        if obj.get("event") == "stdout":
            received += len(obj["data"])
        elif obj.get("status") == wire.EXEC_DONE:
            return received
        elif obj.get("event") == "error" or obj.get("status") in ("SANDBOX_EXECUTION_ERROR", "SANDBOX_ERROR"):
            raise RuntimeError(f"exec failed: {raw}")


def server_round_trips(url: str, count: int) -> list[float]:
    """Seconds of each of ``count`` sequential ``true`` execs (bash) through the server."""

    async def main() -> list[float]:
        ws = await _created(url)
        for _ in range(5):
            await _exec(ws, "bash", "true")
        clock = time.perf_counter
        latencies = []
        for _ in range(count):
            start = clock()
            await _exec(ws, "bash", "true")
            latencies.append(clock() - start)
        await ws.send(wire.KILL_SANDBOX)
        await ws.close()
        return latencies

    return asyncio.run(main())


def direct_round_trips(count: int) -> list[float]:
    """Seconds of each of ``count`` ``subprocess.run(["bash", "-c", "true"])``."""
    clock = time.perf_counter
    latencies = []
    for _ in range(count):
        start = clock()
        subprocess.run(["bash", "-c", "true"], check=True)
        latencies.append(clock() - start)
    return latencies


def server_throughput(url: str, total: int, lines: bool) -> float:
    """Seconds from the exec request to its DONE, for ``total`` bytes of stdout."""

    async def main() -> float:
        ws = await _created(url)
        await _exec(ws, "python", "pass")  # warm-up: first-exec costs out of the timing
        start = time.perf_counter()
        got = await _exec(ws, "python", producer_code(total, lines))
        elapsed = time.perf_counter() - start
        await ws.send(wire.KILL_SANDBOX)
        await ws.close()
        if got != expected_bytes(total, lines):
            raise AssertionError(f"received {got} characters, expected {expected_bytes(total, lines)}")
        return elapsed

    return asyncio.run(main())


def direct_throughput(total: int, lines: bool) -> float:
    """Seconds from starting the producer (``python -u``, as the server runs it) to its pipe's end."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-u", "-c", producer_code(total, lines)], stdout=subprocess.PIPE)
    assert process.stdout is not None
    fd = process.stdout.fileno()
    received = 0
    while chunk := os.read(fd, PIPE_READ):
        received += len(chunk)
    process.wait()
    elapsed = time.perf_counter() - start
    process.stdout.close()
    if received != expected_bytes(total, lines):
        raise AssertionError(f"read {received} bytes, expected {expected_bytes(total, lines)}")
    return elapsed


def _profiled(out: str, argv: list[str]) -> None:
    """Run ``sandbox_server`` with ``argv`` under cProfile, timing CPU rather than wall clock.

    On a shared machine wall-clock profiles charge whatever ran while the
    server was descheduled to the function it was in.
    """
    import cProfile

    from sandbox_server._cli import main

    profiler = cProfile.Profile(time.process_time)
    try:
        profiler.runcall(main, argv)
    finally:
        profiler.dump_stats(out)


if __name__ == "__main__":
    # ``python -m bench.server OUT SERVER_ARGS...``: the server under cProfile (used by local_server).
    _profiled(sys.argv[1], sys.argv[2:])
