"""Output chunking (issue 17): how often one ``print()``'s line arrives split across frames, and how late.

Python runs unbuffered (``-u``), so ``print("line", i)`` is four writes
(``"line"``, ``" "``, ``"0"``, ``"\\n"``); a server that turns every pipe read
into a frame sends the line in pieces whenever it reads between two of them.
The protocol allows that, but clients that compare whole frames (upstream's
own tests do) fail on it, so we want it no more often than upstream does.

Both numbers come from a raw ``websockets`` client, the same for every server:

* **split lines**: execs of :data:`SPLIT_CODE`; a line is split when its
  characters arrive in more than one frame.
* **latency**: an exec prints the wall-clock time, then sleeps (longer than
  any merge window, so the next write cannot help); the client subtracts
  it from its own clock when the line is complete. Measured for a whole line
  (text and ``"\\n"``: two writes) and for a partial line (one write with no
  newline, like a prompt), the case a merge window can delay most. Client and
  server run on this machine, so the clocks are the same.

Our server runs as ``python -m sandbox_server`` in a child process; the
upstream server only if its URL is given (``--upstream-url``, see
/work/shared/upstream-peer/README.md for running it locally).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire

#: 20 lines of four writes each.
SPLIT_CODE = 'for i in range(20): print("line", i)'
#: Seconds between two timed writes: far above any merge window, so each write is timed on its own.
LATENCY_GAP = 0.02
_LINE_CODE = "import time\nfor _ in range({n}):\n    print(repr(time.time()))\n    time.sleep({gap})\n"
# One write with no newline; ";" lets the client find where each one ends.
_PARTIAL_CODE = (
    "import sys, time\nfor _ in range({n}):\n    sys.stdout.write(repr(time.time()) + ';')\n    time.sleep({gap})\n"
)
_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Chunking:
    lines: int = 0
    split: int = 0
    #: Seconds from the write of a whole line to its arrival, one per line.
    line_latency: list[float] = field(default_factory=list)
    #: Seconds from a write with no newline to its arrival.
    partial_latency: list[float] = field(default_factory=list)

    @property
    def split_fraction(self) -> float:
        return self.split / self.lines if self.lines else 0.0


def count_split_lines(frames: list[str]) -> tuple[int, int]:
    """(lines, lines whose characters arrived in more than one frame) of one stream's frames."""
    lines = split = 0
    started = False  # the current line already has characters in an earlier frame
    for data in frames:
        *ended, rest = data.split("\n")
        for index in range(len(ended)):
            lines += 1
            if index == 0 and started:
                split += 1
            started = False
        if rest:
            started = True
    return lines, split


def _timed_values(frames: list[tuple[float, str]], separator: str) -> list[float]:
    """Arrival minus write time of each ``separator``-terminated timestamp in the frames."""
    latencies: list[float] = []
    pending = ""
    for arrived, data in frames:
        pending += data
        *complete, pending = pending.split(separator)
        latencies.extend(arrived - float(value) for value in complete)
    return latencies


async def _run(ws: Any, code: str) -> list[tuple[float, str]]:
    """Stdout frames of one exec, each with the wall-clock time it arrived."""
    await ws.send(json.dumps({"language": "python", "code": code}))
    frames: list[tuple[float, str]] = []
    while True:
        raw = await ws.recv()
        arrived = time.time()
        obj = json.loads(raw)
        if obj.get("event") == "stdout":
            frames.append((arrived, obj["data"]))
        elif obj.get("status") == wire.EXEC_DONE:
            return frames
        elif obj.get("event") == "error" or obj.get("status") in ("SANDBOX_EXECUTION_ERROR", "SANDBOX_ERROR"):
            raise RuntimeError(f"exec failed: {raw}")


async def _measure(url: str, runs: int, timed: int) -> Chunking:
    from websockets.asyncio.client import connect

    result = Chunking()
    async with connect(url.replace("http", "ws", 1) + "/create", max_size=None) as ws:
        await ws.send(wire.CREATE_INIT)
        while json.loads(await ws.recv()).get("status") != wire.RUNNING:
            pass
        await _run(ws, "pass")  # warm-up: first-exec costs out of the numbers
        for _ in range(runs):
            lines, split = count_split_lines([data for _, data in await _run(ws, SPLIT_CODE)])
            result.lines += lines
            result.split += split
        code = _LINE_CODE.format(n=timed, gap=LATENCY_GAP)
        result.line_latency = _timed_values(await _run(ws, code), "\n")
        code = _PARTIAL_CODE.format(n=timed, gap=LATENCY_GAP)
        result.partial_latency = _timed_values(await _run(ws, code), ";")
        await ws.send(wire.KILL_SANDBOX)
    return result


def measure(url: str, runs: int, timed: int) -> Chunking:
    """``runs`` execs of :data:`SPLIT_CODE`, then ``timed`` timed lines and ``timed`` timed partial writes."""
    return asyncio.run(_measure(url, runs, timed))


@contextmanager
def our_server() -> Iterator[str]:
    """``python -m sandbox_server`` on a free loopback port, in its own process (off the client's GIL)."""
    from .server import local_server

    with local_server() as (url, _):
        yield url


if __name__ == "__main__":
    # ``python -m bench.chunking URL [RUNS]``: one measurement of any server, as JSON.
    found = measure(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100, 100)
    print(json.dumps(found.__dict__ | {"split_fraction": found.split_fraction}))  # noqa: T201
