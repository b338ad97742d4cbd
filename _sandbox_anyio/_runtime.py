"""What the driver needs from the event loop on its hot path: a clock, deadlines, events, a cancel check.

anyio's generic versions look the running backend up on every call (sniffio,
then a context variable), and on asyncio each of its cancel scopes keeps
bookkeeping of its own: together most of our cost per exec. So each runtime
package gives its ``Sandbox`` a :class:`Runtime` made of its loop's native
primitives (``sandbox_asyncio._runtime``, ``sandbox_trio._runtime``), and
:data:`ANYIO` serves where the runtime is not known (a transport of the
caller's own) or speed does not matter.

One rule makes the native deadlines safe: what runs under
:meth:`Runtime.deadline` never enters a shielded anyio cancel scope. On
asyncio a native timeout cancels the task (``Task.cancel``), which anyio's
shields do not hold back; so closing a socket, which must not be cut short,
happens in the background writer, and the calls whose work may shield
(opening, killing the sandbox, checkpoints, snapshots) keep :class:`deadline`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol

import anyio
import anyio.lowlevel

from sandbox_proto import SandboxTimeoutError


class Event(Protocol):
    """A one-time event: set once, waited on by any number of tasks."""

    def set(self) -> None: ...

    async def wait(self) -> object: ...


class CancelScope(Protocol):
    """What :class:`deadline` needs of a cancel scope: anyio's and trio's both fit."""

    @property
    def cancelled_caught(self) -> bool: ...

    def __enter__(self) -> object: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None: ...


def timeout_error(what: str, timeout: float) -> SandboxTimeoutError:
    return SandboxTimeoutError(f"{what} took longer than {timeout:g}s")


class Runtime(ABC):
    """The event loop's own primitives, as the driver uses them."""

    __slots__ = ()

    #: The loop's clock, in seconds (the clock of its timers and deadlines).
    now: Callable[[], float]

    #: Raises at once if the task is cancelled, else returns without yielding; ``None`` where
    #: the runtime's own primitives make no such check (asyncio: an uncontended ``Lock``, a set
    #: ``Event``), so neither do ours.
    checkpoint_if_cancelled: Callable[[], Awaitable[None]] | None

    @abstractmethod
    def deadline(self, timeout: float | None, what: str) -> AbstractContextManager[None]:
        """Raise :class:`SandboxTimeoutError` ("``what`` took longer than ...") if the block outlasts ``timeout``.

        ``None``: no limit. The block must not enter a shielded anyio scope (see the module's note).
        """

    @abstractmethod
    def event(self) -> Event: ...

    def shield(self) -> AbstractContextManager[object]:
        """A block that outer cancellations wait for (anyio's; asyncio's own tasks have none)."""
        return anyio.CancelScope(shield=True)


class deadline:
    """``anyio.fail_after`` raising :class:`SandboxTimeoutError` that says what timed out.

    Safe around shielded anyio scopes on every runtime. A bare cancel scope, as
    ``fail_after`` makes, without its two generator-based context managers;
    with no timeout there is no cancel scope at all.
    """

    __slots__ = ("_scope", "_timeout", "_what")

    def __init__(self, timeout: float | None, what: str) -> None:
        self._scope: CancelScope | None = None
        self._timeout = timeout
        self._what = what

    def __enter__(self) -> None:
        if self._timeout is not None:
            self._scope = scope = self._open_scope(self._timeout)
            scope.__enter__()

    @staticmethod
    def _open_scope(timeout: float) -> CancelScope:
        """A cancel scope whose deadline is ``timeout`` from now (a runtime's own, in subclasses)."""
        return anyio.CancelScope(deadline=anyio.current_time() + timeout)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        scope = self._scope
        if scope is None:
            return None
        suppressed = scope.__exit__(exc_type, exc, tb)
        # Nobody else can cancel this private scope: a cancellation it caught is its deadline's.
        if (exc_type is None or suppressed) and scope.cancelled_caught:
            assert self._timeout is not None
            raise timeout_error(self._what, self._timeout) from None
        return suppressed


class AnyioRuntime(Runtime):
    """anyio's generic primitives: they work on any backend, looking it up on each call."""

    __slots__ = ()

    now = staticmethod(anyio.current_time)
    checkpoint_if_cancelled = staticmethod(anyio.lowlevel.checkpoint_if_cancelled)

    def deadline(self, timeout: float | None, what: str) -> deadline:
        return deadline(timeout, what)

    def event(self) -> Event:
        return anyio.Event()


ANYIO = AnyioRuntime()
