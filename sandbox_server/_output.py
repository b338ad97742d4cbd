"""The output log: every output frame of a sandbox, numbered, kept for delivery and replay."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sandbox_proto import Stream

__all__ = ["OutputChunk", "OutputLog", "Signal"]


class Signal:
    """Wake every current waiter; cheap, edge-triggered, single-threaded."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        # Made by the first waiter only: fired once per output frame, mostly with no one
        # waiting, and every idle sandbox has one (an Event and its deque are ~0.6 KiB).
        self._event: asyncio.Event | None = None

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


# Not frozen: one is built per output frame, and a frozen dataclass costs 3x as much to build.
# Read-only by convention.
@dataclass(slots=True)
class OutputChunk:
    seq: int
    stream: Stream
    data: str
    size: int  # bytes read from the pipe for this chunk: what the bounds count


class OutputLog:
    """Every output frame of a sandbox, numbered, retained up to a byte bound.

    Frames not yet delivered to a connection are never evicted (they are the
    detached-output queue); delivered ones are kept for ``seq`` replay until
    the bound pushes them out.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._frames: list[OutputChunk] = []
        self._head = 0  # index of the oldest retained frame in _frames
        self._retained_bytes = 0
        self.undelivered_bytes = 0
        self.next_seq = 1
        #: Highest seq handed to a connection.
        self.delivered = 0
        self.changed = Signal()

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def full(self) -> bool:
        return self.undelivered_bytes >= self.limit

    def _index(self, seq: int) -> int:
        first = self._frames[self._head].seq if self._head < len(self._frames) else self.next_seq
        return self._head + max(0, seq - first)

    def append(self, stream: Stream, data: str, size: int) -> OutputChunk:
        chunk = self._add(stream, data, size)
        self._evict()
        self.changed.fire()
        return chunk

    def extend(self, stream: Stream, pieces: list[tuple[str, int]]) -> None:
        """:meth:`append` each ``(data, size)``, waking the readers once for all of them."""
        for data, size in pieces:
            self._add(stream, data, size)
        self._evict()
        self.changed.fire()

    def _add(self, stream: Stream, data: str, size: int) -> OutputChunk:
        chunk = OutputChunk(self.next_seq, stream, data, size)
        self.next_seq += 1
        self._frames.append(chunk)
        self._retained_bytes += size
        self.undelivered_bytes += size
        return chunk

    def frames_after(self, seq: int, upto: int, limit: int) -> list[OutputChunk]:
        """Up to ``limit`` retained frames with ``seq < frame.seq <= upto``, oldest first."""
        start = self._index(seq + 1)
        # Seqs are contiguous in the list, so ``upto`` maps to an index too.
        end = min(self._index(upto + 1), start + limit) if upto > seq else start
        return self._frames[start:end]

    def mark_delivered(self, seq: int) -> None:
        if seq <= self.delivered:
            return
        for chunk in self._frames[self._index(self.delivered + 1) : self._index(seq + 1)]:
            self.undelivered_bytes -= chunk.size
        self.delivered = seq
        self._evict()

    def _evict(self) -> None:
        frames = self._frames
        while (
            self._retained_bytes > self.limit and self._head < len(frames) and frames[self._head].seq <= self.delivered
        ):
            self._retained_bytes -= frames[self._head].size
            self._head += 1
        # Compact now and then so the list does not grow without end.
        if self._head > 1024 and self._head * 2 > len(frames):
            del frames[: self._head]
            self._head = 0
