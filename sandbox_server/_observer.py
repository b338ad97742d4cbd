"""How a sandbox tells the connection attached to it about its lifecycle."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from sandbox_proto import Status

__all__ = ["Notify", "SandboxObserver", "quietly", "report", "tell"]

logger = logging.getLogger("sandbox_server")

#: Sends one status frame to the connection being set up.
Notify = Callable[[Status], Awaitable[None]]


class SandboxObserver(Protocol):
    """The connection attached to a sandbox, as the sandbox's lifecycle sees it."""

    async def sandbox_status(self, status: Status) -> None: ...

    async def sandbox_error(self, status: Status, message: str) -> None: ...

    async def wait_stream_end(self) -> None: ...


async def tell(observer: SandboxObserver | None, status: Status) -> None:
    if observer is not None:
        await quietly(functools.partial(observer.sandbox_status, status))


async def report(observer: SandboxObserver | None, status: Status, message: str) -> None:
    """An error pair to the attached connection, if any: detached, nobody is told (as for statuses)."""
    if observer is not None:
        await quietly(functools.partial(observer.sandbox_error, status, message))


async def quietly(step: Callable[[], Awaitable[None]]) -> None:
    """Run a notification to a connection; a dead connection must not stop a deletion."""
    try:
        await step()
    except Exception:
        logger.debug("notifying a connection failed", exc_info=True)
