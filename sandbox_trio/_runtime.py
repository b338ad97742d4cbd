"""trio's own primitives for the driver's hot path (see ``_sandbox_anyio._runtime``).

anyio on trio wraps these same objects, after looking the backend up on each call.
"""

from __future__ import annotations

from types import TracebackType

import trio

from _sandbox_anyio._runtime import Runtime, timeout_error


class _Deadline:
    """``trio.fail_after`` raising :class:`SandboxTimeoutError` that says what timed out."""

    __slots__ = ("_scope", "_timeout", "_what")

    def __init__(self, timeout: float | None, what: str) -> None:
        self._scope: trio.CancelScope | None = None
        self._timeout = timeout
        self._what = what

    def __enter__(self) -> None:
        if self._timeout is not None:
            self._scope = scope = trio.CancelScope(deadline=trio.current_time() + self._timeout)
            scope.__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        scope = self._scope
        if scope is None:
            return None
        suppressed = scope.__exit__(exc_type, exc, tb)
        # Nobody else can cancel this private scope: a cancellation it caught is its deadline's.
        if scope.cancelled_caught:
            assert self._timeout is not None
            raise timeout_error(self._what, self._timeout) from None
        return suppressed


class TrioRuntime(Runtime):
    __slots__ = ()

    now = staticmethod(trio.current_time)

    def deadline(self, timeout: float | None, what: str) -> _Deadline:
        return _Deadline(timeout, what)

    checkpoint_if_cancelled = staticmethod(trio.lowlevel.checkpoint_if_cancelled)

    def event(self) -> trio.Event:
        return trio.Event()

    def shield(self) -> trio.CancelScope:
        return trio.CancelScope(shield=True)


TRIO = TrioRuntime()
