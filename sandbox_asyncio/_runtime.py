"""asyncio's own primitives for the driver's hot path (see ``_sandbox_anyio._runtime``)."""

from __future__ import annotations

import asyncio
from asyncio import CancelledError, current_task, get_running_loop
from types import TracebackType

from _sandbox_anyio._runtime import Runtime, timeout_error


def _now() -> float:
    return get_running_loop().time()


class _Event:
    """What the driver needs of ``asyncio.Event``, without its deque and its loop check: a future per waiter."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        if not self._set:
            self._set = True
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self) -> None:
        if self._set:
            return
        waiter = get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            # Timed out or cancelled: a wait retried on the same event must not pile up futures.
            self._waiters.remove(waiter)
            raise


class _Deadline:
    """``asyncio.timeout``, raising :class:`SandboxTimeoutError` that says what timed out.

    The same cancel/uncancel protocol, so it nests with ``asyncio.timeout``,
    ``TaskGroup`` and anyio's scopes as they nest with each other: if the task
    was also cancelled from elsewhere, that cancellation goes on instead.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_task", "_timeout", "_what")

    def __init__(self, timeout: float | None, what: str) -> None:
        self._timeout = timeout
        self._what = what
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    def __enter__(self) -> None:
        if self._timeout is None:
            return
        loop = get_running_loop()
        task = current_task(loop)
        if task is None:
            raise RuntimeError("a sandbox call must run in an asyncio task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = loop.call_at(loop.time() + self._timeout, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        handle = self._handle
        if handle is None:
            return
        handle.cancel()
        if self._expired and exc_type is CancelledError and self._task.uncancel() <= self._cancelling:
            assert self._timeout is not None
            raise timeout_error(self._what, self._timeout) from None


class AsyncioRuntime(Runtime):
    __slots__ = ()

    now = staticmethod(_now)
    # A cancellation asked for while the task runs is delivered at its next real wait, as with
    # asyncio's own primitives.
    checkpoint_if_cancelled = None

    def deadline(self, timeout: float | None, what: str) -> _Deadline:
        return _Deadline(timeout, what)

    def event(self) -> _Event:
        return _Event()


ASYNCIO = AsyncioRuntime()
