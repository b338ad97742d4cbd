"""A running exec and its output streams, for asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from sandbox_proto import (
    LocalProtocolError,
    OutputBudget,
    OutputBuffer,
    SandboxException,
    SandboxStateError,
    SandboxTimeoutError,
)

if TYPE_CHECKING:
    from ._sandbox import Sandbox

#: How long a waiting call on a process waits by default, in seconds.
DEFAULT_WAIT_TIMEOUT = 600.0
DEFAULT_KILL_TIMEOUT = 5.0
DEFAULT_STDIN_TIMEOUT = 30.0


class SandboxStream:
    """Output of one stream (stdout or stderr) of a process.

    ``async for line in stream`` yields lines (with their ``\\n``; the last
    may lack it); :meth:`read` returns chunks as they arrive (prompts with no
    newline included); :meth:`read_all` everything until the process ends.
    """

    def __init__(self, name: str, budget: OutputBudget, space: asyncio.Event) -> None:
        self.name = name
        self._buffer = OutputBuffer(budget)
        self._budget = budget
        self._space = space
        self._readable = asyncio.Event()

    def __repr__(self) -> str:
        return f"<SandboxStream {self.name}{' eof' if self._buffer.eof else ''}>"

    # -- fed by the adapter

    def _feed(self, data: str) -> None:
        self._buffer.feed(data)
        if self._budget.full:
            self._space.clear()
        self._readable.set()

    def _end(self, error: SandboxException | None) -> None:
        self._buffer.end(error)
        self._readable.set()

    # -- read by the user

    @property
    def at_eof(self) -> bool:
        return self._buffer.at_eof

    async def _next(self, pop: Callable[[], str | None], timeout: float | None, what: str) -> str:
        async with _deadline(timeout, f"{what} {self.name}"):
            while (item := pop()) is None:
                self._readable.clear()
                await self._readable.wait()
        if not self._budget.full:
            self._space.set()
        return item

    async def read(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """The next chunk of output, or ``""`` at end of stream."""
        return await self._next(self._buffer.pop_chunk, timeout, "reading")

    async def readline(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """One line with its ``\\n``; the last line of the stream may lack it; ``""`` at end."""
        return await self._next(self._buffer.pop_line, timeout, "reading a line of")

    async def read_all(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """Everything until the process ends (what was already read is not repeated)."""
        parts: list[str] = []

        def pop() -> str | None:
            parts.append(self._buffer.pop_all())
            return "" if self._buffer.eof else None

        try:
            await self._next(pop, timeout, "reading all of")
        except BaseException:
            self._buffer.unread("".join(parts))  # a timed-out read_all loses nothing
            raise
        return "".join(parts)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while line := await self.readline(timeout=None):
            yield line


class SandboxProcess:
    """One exec in a sandbox: its output streams, stdin, exit and kill."""

    def __init__(self, sandbox: Sandbox, exec_id: int, buffer_limit: int) -> None:
        self._sandbox = sandbox
        self.exec_id = exec_id
        budget = OutputBudget(buffer_limit)
        #: Set while the user's buffers have room; the reader waits on it (back-pressure).
        self._space = asyncio.Event()
        self._space.set()
        self.stdout = SandboxStream("stdout", budget, self._space)
        self.stderr = SandboxStream("stderr", budget, self._space)
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done = asyncio.Event()
        self._error: SandboxException | None = None
        self._kill_waiter: asyncio.Future[None] | None = None
        #: The exit status reported by the server (``exit_code`` extension), else ``None``.
        self.returncode: int | None = None
        #: ``True`` once output may have been lost (reconnect to a server without ``seq``).
        self.output_may_be_incomplete = False

    def __repr__(self) -> str:
        state = "done" if self._done.is_set() else "running"
        return f"<SandboxProcess {self.exec_id} {state} returncode={self.returncode}>"

    # -- fed by the adapter

    def _set_started(self) -> None:
        if not self._started.done():
            self._started.set_result(None)

    def _finish(self, returncode: int | None, error: SandboxException | None) -> None:
        self.returncode = returncode
        self._error = error
        if not self._started.done():
            self._started.set_exception(error or SandboxStateError("the process ended before it started"))
            self._started.exception()  # retrieved: nobody else may await it
        self.stdout._end(error)
        self.stderr._end(error)
        self._space.set()  # nothing more will arrive for this process
        self._done.set()
        if self._kill_waiter is not None and not self._kill_waiter.done():
            self._kill_waiter.set_result(None)

    def _feed(self, stream: str, data: str) -> None:
        (self.stdout if stream == "stdout" else self.stderr)._feed(data)

    def _kill_failed(self, error: SandboxException) -> None:
        if self._kill_waiter is not None and not self._kill_waiter.done():
            self._kill_waiter.set_exception(error)

    # -- user API

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> int | None:
        """Wait for the process to end; returns :attr:`returncode` (``None`` if unknown).

        Raises the connection's error if the process could not be followed to its end.
        """
        await _bounded(self._done.wait(), timeout, "waiting for the process")
        if self._error is not None:
            raise self._error
        return self.returncode

    async def write_to_stdin(self, data: str, *, timeout: float | None = DEFAULT_STDIN_TIMEOUT) -> None:
        """Send ``data`` verbatim to the process's stdin (add ``\\n`` for line readers)."""
        try:
            self._sandbox._protocol.write_stdin(self.exec_id, data)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        await _bounded(self._sandbox._flush(), timeout, "writing to stdin")

    async def close_stdin(self, *, timeout: float | None = DEFAULT_STDIN_TIMEOUT) -> None:
        """Signal end-of-file on stdin (needs the server's ``close_stdin`` extension)."""
        try:
            self._sandbox._protocol.close_stdin(self.exec_id)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        await _bounded(self._sandbox._flush(), timeout, "closing stdin")

    async def kill(self, *, timeout: float | None = DEFAULT_KILL_TIMEOUT) -> None:
        """Kill the process (its whole process group on our server) and wait for its end."""
        if self._done.is_set():
            return
        if self._kill_waiter is None or self._kill_waiter.done():
            self._kill_waiter = asyncio.get_running_loop().create_future()
        waiter = self._kill_waiter
        self._sandbox._protocol.kill_process(self.exec_id)
        try:
            async with _deadline(timeout, "killing the process"):
                await self._sandbox._flush()
                await asyncio.shield(waiter)
        except SandboxTimeoutError:
            # As upstream: stop waiting and consider the process gone.
            self._sandbox._protocol.kill_process_timed_out(self.exec_id)
            self._sandbox._dispatch()


class _deadline:
    """``asyncio.timeout`` that raises :class:`SandboxTimeoutError` with what timed out."""

    def __init__(self, timeout: float | None, what: str) -> None:
        self._cm = asyncio.timeout(timeout)
        self._timeout = timeout
        self._what = what

    async def __aenter__(self) -> None:
        await self._cm.__aenter__()

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._cm.__aexit__(*exc_info)  # type: ignore[arg-type]
        except TimeoutError:
            raise SandboxTimeoutError(f"{self._what} took longer than {self._timeout:g}s") from None


async def _bounded(awaitable: object, timeout: float | None, what: str) -> None:
    async with _deadline(timeout, what):
        await awaitable  # type: ignore[misc]
