"""Output chunking (issue 17): a line written in several writes is one frame; frames stay at most 1024 bytes.

Most tests drive :class:`Execution`'s pipe callbacks directly, with a stub
sandbox, so which read arrives when is decided by the test and not by the
scheduler. The end-to-end ones run real processes: their framing checks are
either independent of timing (sizes, content) or statistical.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from server._server_wire import Wire, st

from sandbox_server import LocalServer
from sandbox_server._execution import READ_SIZE, Execution
from sandbox_server._output import OutputLog

pytestmark = pytest.mark.anyio


def _execution(output_limit: int = 0) -> tuple[Execution, OutputLog]:
    log = OutputLog(1 << 20)
    limits = SimpleNamespace(output=output_limit, cpu_seconds=0)
    sandbox: Any = SimpleNamespace(log=log, manager=SimpleNamespace(isolation=SimpleNamespace(limits=limits)))
    return Execution(sandbox, "python"), log


def _frames(log: OutputLog) -> list[tuple[str, str, int]]:
    return [(c.stream, c.data, c.size) for c in log.frames_after(0, log.last_seq, 1 << 20)]


@pytest.fixture
def group() -> Iterator[int]:
    """A real process group for ``kill()`` to signal (the stub exec has no process of its own)."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield process.pid
    process.kill()
    process.wait(timeout=10)


async def test_a_read_ending_mid_line_is_joined_by_the_rest_of_the_line() -> None:
    ex, log = _execution()
    # print("line", 0) unbuffered: four writes; a read may fall between any two.
    for write in (b"line", b" ", b"0"):
        ex._on_data(1, write)
        assert _frames(log) == []
    ex._on_data(1, b"\n")
    assert _frames(log) == [("stdout", "line 0\n", 7)]
    # A rest that ends a line goes out at once, and nothing stays armed.
    ex._on_data(1, b"line 1\n")
    assert _frames(log)[-1] == ("stdout", "line 1\n", 7)
    assert ex._held_timer is None


async def test_a_held_rest_goes_out_when_the_window_ends() -> None:
    ex, log = _execution()
    ex._on_data(1, b"name? ")  # a prompt: no newline is coming
    assert _frames(log) == []
    async with asyncio.timeout(5):
        await log.changed.wait()  # fired by the window's timer, however late the loop runs it
    assert _frames(log) == [("stdout", "name? ", 6)]
    assert ex._held_timer is None


async def test_frames_are_at_most_one_piece_and_rests_join_the_next_read() -> None:
    ex, log = _execution()
    ex._on_data(1, b"x" * 3000)
    assert _frames(log) == [("stdout", "x" * READ_SIZE, READ_SIZE)] * 2  # the last 952 bytes wait
    ex._on_data(1, b"y" * 100 + b"\n")
    frames = _frames(log)
    assert [size for _, _, size in frames] == [1024, 1024, 1024, 29]
    assert "".join(data for _, data, _ in frames) == "x" * 3000 + "y" * 100 + "\n"


async def test_a_character_split_between_reads_or_pieces_stays_whole() -> None:
    ex, log = _execution()
    euro = "€".encode()
    ex._on_data(1, euro[:2])
    ex._on_data(1, euro[2:] + b"\n")
    assert _frames(log) == [("stdout", "€\n", 4)]
    ex._on_data(1, euro * 400 + b"\n")  # 1201 bytes: the first piece ends inside a character
    frames = _frames(log)[1:]
    assert [size for _, _, size in frames] == [1024, 177]
    assert "".join(data for _, data, _ in frames) == "€" * 400 + "\n"


async def test_a_read_of_the_other_stream_frames_the_held_bytes_first() -> None:
    ex, log = _execution()
    ex._on_data(1, b"out ")
    ex._on_data(2, b"err\n")
    ex._on_data(1, b"more\n")
    assert _frames(log) == [("stdout", "out ", 4), ("stderr", "err\n", 4), ("stdout", "more\n", 5)]


async def test_end_of_file_frames_the_held_bytes_at_once() -> None:
    ex, log = _execution()
    ex._on_data(2, b"no newline")
    ex._on_pipe_closed(2)
    assert _frames(log) == [("stderr", "no newline", 10)]
    assert ex._held_timer is None


async def test_a_kill_frames_what_was_read_and_nothing_after(group: int) -> None:
    ex, log = _execution()
    ex.pid = group
    ex._on_data(1, b"read before the kill")
    ex.kill()
    assert _frames(log) == [("stdout", "read before the kill", 20)]
    assert ex._held_timer is None
    ex._on_data(1, b" read after\n")
    ex._on_pipe_closed(1)
    assert _frames(log) == [("stdout", "read before the kill", 20)]


async def test_held_bytes_precede_the_output_limit_note(group: int) -> None:
    ex, log = _execution(output_limit=10)
    ex.pid = group
    ex._on_data(1, b"12345")
    ex._on_data(1, b"6789012345\n")  # past the limit: cut to 10 bytes, then the note
    frames = _frames(log)
    assert frames[0] == ("stdout", "1234567890", 10)
    assert frames[1][0] == "stderr" and "output limit exceeded" in frames[1][1]
    assert len(frames) == 2 and ex.killed


# -- end to end ---------------------------------------------------------------------


@pytest.fixture
async def upstream_local() -> AsyncIterator[LocalServer]:
    # Chunking is the same in both modes; upstream frames keep the test out of extension negotiation.
    async with LocalServer(port=0, protocol="upstream") as server:
        yield server


async def _stdout_frames(wire: Wire, code: str) -> list[str]:
    await wire.send({"language": "python", "code": code})
    await wire.expect(st("SANDBOX_EXECUTION_RUNNING"))
    frames = []
    while (frame := await wire.frame()).get("status") != "SANDBOX_EXECUTION_DONE":
        assert frame["event"] == "stdout", frame
        frames.append(frame["data"])
    return frames


async def test_a_large_write_is_framed_in_pieces_of_at_most_1024_bytes(upstream_local: LocalServer) -> None:
    wire = await Wire.create(upstream_local.url, "upstream")
    frames = await _stdout_frames(wire, "import os\nos.write(1, b'x' * 3000)\nos.write(1, b'y' * 5000)")
    assert all(len(data) <= READ_SIZE for data in frames)
    assert "".join(frames) == "x" * 3000 + "y" * 5000


def _split_lines(frames: list[str]) -> int:
    """Frames that end mid-line (all but the last do so only when a line was split)."""
    return sum(not data.endswith("\n") for data in frames)


#: Most lines of 100 that may split, as a median: 0-1 on a quiet machine, more when four test
#: workers share two cores and the server is descheduled past its window; without the window
#: the first test below splits 64-98.
SPLIT_BOUND = 10


async def _median_split(wire: Wire, code: str, expected: str) -> tuple[float, list[int]]:
    # A line can still split if the process is descheduled for longer than the
    # window between two writes: the median of five tries is what counts, so a
    # burst of load spoils one try, not the verdict.
    counts = []
    for _ in range(5):
        frames = await _stdout_frames(wire, code)
        assert "".join(frames) == expected
        counts.append(_split_lines(frames))
    return statistics.median(counts), counts


async def test_two_writes_within_the_window_arrive_as_one_frame(upstream_local: LocalServer) -> None:
    # 0.3 ms between text and newline: far longer than the server takes to wake
    # up and read (so without the window 64-98 of these 100 lines split), far
    # shorter than the 2 ms window. Measured with the window: median 0, under load too.
    wire = await Wire.create(upstream_local.url, "upstream")
    code = (
        "import sys, time\n"
        "for i in range(100):\n"
        "    sys.stdout.write(f'line {i}')\n"
        "    start = time.perf_counter()\n"
        "    while time.perf_counter() - start < 0.0003: pass\n"
        "    sys.stdout.write('\\n')\n"
        "    time.sleep(0.001)\n"
    )
    median, counts = await _median_split(wire, code, "".join(f"line {i}\n" for i in range(100)))
    assert median <= SPLIT_BOUND, f"lines split in five tries of 100: {counts}"


async def test_print_lines_arrive_whole(upstream_local: LocalServer) -> None:
    # The case of issue 17 as is: print("line", i) is four writes microseconds
    # apart. Without the window how many split depends on the machine's load
    # (0-12% a try on an idle machine, up to 88% on a busy one); with it, a median
    # of 0-1 of 100 either way.
    wire = await Wire.create(upstream_local.url, "upstream")
    code = "import time\nfor i in range(100):\n    print('line', i)\n    time.sleep(0.001)"
    median, counts = await _median_split(wire, code, "".join(f"line {i}\n" for i in range(100)))
    assert median <= SPLIT_BOUND, f"lines split in five tries of 100: {counts}"
