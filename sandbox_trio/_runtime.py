"""trio's own primitives for the driver's hot path (see ``_sandbox_anyio._runtime``).

anyio on trio wraps these same objects, after looking the backend up on each call.
"""

from __future__ import annotations

import trio

from _sandbox_anyio._runtime import Runtime, deadline


class _Deadline(deadline):
    """``trio.fail_after`` raising :class:`SandboxTimeoutError` that says what timed out."""

    __slots__ = ()

    @staticmethod
    def _open_scope(timeout: float) -> trio.CancelScope:
        return trio.CancelScope(deadline=trio.current_time() + timeout)


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
