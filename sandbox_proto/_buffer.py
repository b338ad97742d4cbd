"""Output held for the user between the socket and their reads, with no I/O.

Adapters wrap these in their runtime's waiting primitives; the bookkeeping
(chunks, line splitting, end of stream, the shared byte budget that decides
when the socket must stop being read) lives here once for every runtime.
"""

from __future__ import annotations

from collections import deque

from ._errors import SandboxException


class OutputBudget:
    """Characters held across both streams of one process; ``full`` pauses reading the socket."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def full(self) -> bool:
        return self.used >= self.limit


class OutputBuffer:
    """One stream's unread output, in arrival order."""

    def __init__(self, budget: OutputBudget) -> None:
        self._chunks: deque[str] = deque()
        self._budget = budget
        # Leading chunks already known to hold no newline: keeps long lines linear.
        self._scanned = 0
        #: No more data will arrive.
        self.eof = False
        #: Why the stream ended early, if it did.
        self.error: SandboxException | None = None

    def feed(self, data: str) -> None:
        if data:
            self._chunks.append(data)
            self._budget.used += len(data)

    def end(self, error: SandboxException | None = None) -> None:
        self.eof = True
        self.error = error

    @property
    def at_eof(self) -> bool:
        return self.eof and not self._chunks

    def pop_chunk(self) -> str | None:
        """The next chunk; ``""`` at end of stream; ``None`` if the caller must wait."""
        if self._chunks:
            self._scanned = max(0, self._scanned - 1)
            chunk = self._chunks.popleft()
            self._budget.used -= len(chunk)
            return chunk
        return "" if self.eof else None

    def pop_line(self) -> str | None:
        """The next whole line (with ``\\n``); at end of stream the unterminated rest,
        then ``""``; ``None`` if the caller must wait for more output."""
        chunks = self._chunks
        for index in range(self._scanned, len(chunks)):
            newline = chunks[index].find("\n")
            if newline < 0:
                self._scanned = index + 1
                continue
            self._scanned = 0
            parts = [chunks.popleft() for _ in range(index)]
            head = chunks.popleft()
            if newline + 1 < len(head):
                chunks.appendleft(head[newline + 1 :])
            parts.append(head[: newline + 1])
            line = "".join(parts)
            self._budget.used -= len(line)
            return line
        if not self.eof:
            return None
        return self.pop_all()

    def unread(self, text: str) -> None:
        """Put ``text`` back in front, e.g. what a timed-out read had gathered."""
        if text:
            self._chunks.appendleft(text)
            self._budget.used += len(text)
            self._scanned = 0

    def pop_all(self) -> str:
        """Everything buffered now."""
        text = "".join(self._chunks)
        self._chunks.clear()
        self._scanned = 0
        self._budget.used -= len(text)
        return text
