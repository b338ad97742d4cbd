"""A running exec and its output streams, on the sandbox's runtime (asyncio or trio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING

from sandbox_proto import (
    LocalProtocolError,
    OutputBudget,
    OutputBuffer,
    SandboxException,
    SandboxStateError,
    SandboxTimeoutError,
)

from ._runtime import Event, Runtime

if TYPE_CHECKING:
    from ._sandbox import BaseSandbox

#: How long a waiting call on a process waits by default, in seconds.
DEFAULT_WAIT_TIMEOUT = 600.0
DEFAULT_KILL_TIMEOUT = 5.0
DEFAULT_STDIN_TIMEOUT = 30.0


class Wakeup:
    """A reusable wake-up: events fire once, so a fresh one is made per wait."""

    __slots__ = ("_event", "_runtime")

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._event: Event | None = None

    def set(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = self._runtime.event()
        await self._event.wait()


class Flag:
    """A one-time event whose event object is made only if someone has to wait.

    Most flags are set before anyone waits (or never waited on at all): they
    then cost a small object, and waiting on a set flag does not yield to the
    event loop (on trio it still raises if the task is cancelled).
    """

    __slots__ = ("_event", "_runtime", "is_set")

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        #: Read, never written, by others.
        self.is_set = False
        self._event: Event | None = None

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            event, self._event = self._event, None  # waiters hold it; later waits need none
            if event is not None:
                event.set()

    async def wait(self) -> None:
        if self.is_set:
            if (check := self._runtime.checkpoint_if_cancelled) is not None:
                await check()
            return
        if self._event is None:
            self._event = self._runtime.event()
        await self._event.wait()


class Outcome(Flag):
    """The one-time result of an operation: success or an error, waited on by the caller."""

    __slots__ = ("error",)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.error: SandboxException | None = None

    def resolve(self, error: SandboxException | None) -> None:
        if not self.is_set:
            self.error = error
            self.set()

    async def wait(self) -> None:
        # Flag.wait written out: one coroutine less on the way of every exec.
        if self.is_set:
            if (check := self._runtime.checkpoint_if_cancelled) is not None:
                await check()
        else:
            if self._event is None:
                self._event = self._runtime.event()
            await self._event.wait()
        if self.error is not None:
            raise self.error


class SendLock:
    """The mutex around sending: a flag and, only while contended, a :class:`Flag`.

    ``anyio.Lock`` allocates a deque per lock (~0.8 KiB per sandbox). Whoever
    holds this lock sends what the core queued, in queue order, so which waiter
    gets it next does not matter.
    """

    __slots__ = ("_free", "_runtime", "busy")

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        #: Read, never written, by others.
        self.busy = False
        self._free: Flag | None = None

    async def acquire(self) -> None:
        if (check := self._runtime.checkpoint_if_cancelled) is not None:
            await check()
        while self.busy:
            if self._free is None:
                self._free = Flag(self._runtime)
            await self._free.wait()
        self.busy = True

    def release(self) -> None:
        self.busy = False
        free, self._free = self._free, None
        if free is not None:
            free.set()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class SandboxStream:
    """Output of one stream (stdout or stderr) of a process.

    ``async for line in stream`` yields lines (with their ``\\n``; the last
    may lack it); :meth:`read` returns chunks as they arrive (prompts with no
    newline included); :meth:`read_all` everything until the process ends.
    """

    def __init__(self, name: str, budget: OutputBudget, space: Callable[[], None], runtime: Runtime) -> None:
        #: ``"stdout"`` or ``"stderr"``.
        self.name = name
        self._buffer = OutputBuffer(budget)
        self._budget = budget
        self._space = space
        self._runtime = runtime
        self._readable = Wakeup(runtime)
        #: How long ``async for`` waits for each line, in seconds (``None``: no limit).
        self.read_timeout: float | None = DEFAULT_WAIT_TIMEOUT
        #: Readers waiting for the next chunk or line. ``read_all`` waits for the end
        #: (or full buffers) instead, so a flood of output does not wake it per frame.
        self._eager_waiters = 0

    def __repr__(self) -> str:
        return f"<SandboxStream {self.name}{' eof' if self._buffer.eof else ''}>"

    # -- fed by the driver

    def _feed(self, data: str) -> None:
        self._buffer.feed(data)
        if self._eager_waiters:
            self._readable.set()

    def _end(self, error: SandboxException | None) -> None:
        self._buffer.end(error)
        self._readable.set()

    # -- read by the user

    @property
    def at_eof(self) -> bool:
        return self._buffer.at_eof

    async def _next(
        self, pop: Callable[[], str | None], timeout: float | None, what: str, *, eager: bool = True
    ) -> str:
        item = pop()
        if item is None:
            with self._runtime.deadline(timeout, f"{what} {self.name}"):
                if eager:
                    self._eager_waiters += 1
                try:
                    while (item := pop()) is None:
                        if not self._budget.full:
                            self._space()  # what we took made room: let the socket be read again
                        await self._readable.wait()
                finally:
                    if eager:
                        self._eager_waiters -= 1
        if not self._budget.full:
            self._space()
        return item

    async def read(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """The next chunk of output, or ``""`` at end of stream."""
        return await self._next(self._buffer.pop_chunk, timeout, "reading")

    async def readline(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """One line with its ``\\n``; the last line of the stream may lack it; ``""`` at end."""
        return await self._next(self._buffer.pop_line, timeout, "reading a line of")

    async def read_all(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """Everything until the process ends (what was already read is not repeated)."""
        if self._buffer.eof:  # the process has ended: all of it is here, no wait
            return self._buffer.pop_all()
        parts: list[str] = []

        def pop() -> str | None:
            parts.append(self._buffer.pop_all())
            return "" if self._buffer.eof else None

        try:
            await self._next(pop, timeout, "reading all of", eager=False)
        except BaseException:
            self._buffer.unread("".join(parts))  # a timed-out or cancelled read_all loses nothing
            raise
        return "".join(parts)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while line := await self.readline(timeout=self.read_timeout):
            yield line


class SandboxProcess:
    """One exec in a sandbox: its output streams, stdin, exit and kill."""

    def __init__(self, sandbox: BaseSandbox, exec_id: int, buffer_limit: int, space: Callable[[], None]) -> None:
        self._sandbox = sandbox
        self._runtime = runtime = sandbox._runtime
        #: This exec's number within its sandbox object (1, 2, ...).
        self.exec_id = exec_id
        self._budget = OutputBudget(buffer_limit)
        #: Called when the user's buffers have room again: reading the socket resumes (back-pressure).
        self._space = space
        #: The process's standard output, a :class:`SandboxStream`.
        self.stdout = SandboxStream("stdout", self._budget, self._space, runtime)
        #: The process's standard error, a :class:`SandboxStream`.
        self.stderr = SandboxStream("stderr", self._budget, self._space, runtime)
        self._started = Outcome(runtime)
        self._done = Flag(runtime)
        self._error: SandboxException | None = None
        #: The kill under way, if one was asked for.
        self._kill: Outcome | None = None
        #: The exit status reported by the server (``exit_code`` extension), else ``None``.
        self.returncode: int | None = None
        #: ``True`` once output may have been lost (reconnect to a server without ``seq``).
        self.output_may_be_incomplete = False
        #: ``True`` once stdin may not all have reached the process (a drop, server without ``stdin_seq``).
        self.stdin_may_be_incomplete = False

    def __repr__(self) -> str:
        state = "done" if self._done.is_set else "running"
        return f"<SandboxProcess {self.exec_id} {state} returncode={self.returncode}>"

    # -- fed by the driver

    def _set_started(self) -> None:
        self._started.resolve(None)

    def _finish(self, returncode: int | None, error: SandboxException | None) -> None:
        if self._done.is_set:
            return
        self.returncode = returncode
        self._error = error
        if not self._started.is_set:
            self._started.resolve(error or SandboxStateError("the process ended before it started"))
        self.stdout._end(error)
        self.stderr._end(error)
        self._space()  # nothing more will arrive for this process
        self._done.set()
        if self._kill is not None:
            self._kill.resolve(None)

    def _feed(self, stream: str, data: str) -> bool:
        """Hold ``data`` for the user; ``True`` if the buffers are now full."""
        (self.stdout if stream == "stdout" else self.stderr)._feed(data)
        if self._budget.used < self._budget.limit:  # not .full: this runs per output frame
            return False
        # Reading is about to pause: wake every reader, read_all included, to make room.
        self.stdout._readable.set()
        self.stderr._readable.set()
        return True

    def _kill_failed(self, error: SandboxException) -> None:
        if self._kill is not None:
            self._kill.resolve(error)

    @property
    def _buffers_full(self) -> bool:
        return self._budget.full and not self._done.is_set

    # -- user API

    @property
    def done(self) -> bool:
        return self._done.is_set

    async def wait(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> int | None:
        """Wait for the process to end; returns :attr:`returncode` (``None`` if unknown).

        Raises the connection's error if the process could not be followed to its end.
        """
        if self._done.is_set:
            if (check := self._runtime.checkpoint_if_cancelled) is not None:
                await check()
        else:
            with self._runtime.deadline(timeout, "waiting for the process"):
                await self._done.wait()
        if self._error is not None:
            raise self._error
        return self.returncode

    async def write_to_stdin(self, data: str, *, timeout: float | None = DEFAULT_STDIN_TIMEOUT) -> None:
        """Send ``data`` verbatim to the process's stdin (add ``\\n`` for line readers)."""
        try:
            self._sandbox._protocol.write_stdin(self.exec_id, data)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        with self._runtime.deadline(timeout, "writing to stdin"):
            await self._sandbox._flush()

    async def close_stdin(self, *, timeout: float | None = DEFAULT_STDIN_TIMEOUT) -> None:
        """Signal end-of-file on stdin (needs the server's ``close_stdin`` extension)."""
        try:
            self._sandbox._protocol.close_stdin(self.exec_id)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        with self._runtime.deadline(timeout, "closing stdin"):
            await self._sandbox._flush()

    async def kill(self, *, timeout: float | None = DEFAULT_KILL_TIMEOUT) -> None:
        """Kill the process (its whole process group on our server) and wait for its end.

        During a reconnect the kill is sent once the sandbox is reattached.
        If the timeout runs out after the kill was sent, the process is taken
        as ended (as upstream does); if it could not even be sent,
        :class:`SandboxTimeoutError` is raised and the kill stays owed.
        """
        if self._done.is_set:
            return
        if self._kill is None or self._kill.is_set:
            self._kill = Outcome(self._runtime)  # the first kill, or an earlier one failed: try again
        kill = self._kill
        self._sandbox._protocol.kill_process(self.exec_id)
        try:
            with self._runtime.deadline(timeout, "killing the process"):
                await self._sandbox._flush()
                await kill.wait()
        except SandboxTimeoutError:
            ended = self._sandbox._protocol.kill_process_timed_out(self.exec_id)
            self._sandbox._dispatch()
            if not ended:
                raise SandboxTimeoutError(
                    f"the kill could not be sent within {timeout:g}s; it is sent once the connection is back"
                ) from None
