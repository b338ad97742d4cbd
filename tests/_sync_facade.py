"""An async face over ``sandbox_sync``, so the conformance suite (written async) runs on it too.

Every blocking call runs in a worker thread (``anyio.to_thread.run_sync``), so
the test's own event loop keeps running while ``sandbox_sync`` works on its
loop: the calls cross two threads, as they would in a program that uses the
sync API from threads. What comes back (a sandbox, a process, a stream, an
iterator) is wrapped again. Private attributes that some tests read
(``_reading_paused``, ``_budget``, ``_protocol``) come from the asyncio objects
inside.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any

import anyio.to_thread

import sandbox_sync

_END = object()


def _wrap(value: Any) -> Any:
    if isinstance(value, sandbox_sync.Sandbox | sandbox_sync.SandboxProcess | sandbox_sync.SandboxStream):
        return Facade(value)
    if isinstance(value, Iterator):
        return AsyncIteratorFacade(value)
    return value


async def _in_thread(function: Callable[[], Any]) -> Any:
    return _wrap(await anyio.to_thread.run_sync(function))


class AsyncIteratorFacade:
    """``async for`` over a sync iterator: each ``next`` in a worker thread."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator

    def __aiter__(self) -> AsyncIteratorFacade:
        return self

    async def __anext__(self) -> Any:
        # A sentinel: StopIteration cannot travel through a future.
        item = await anyio.to_thread.run_sync(next, self._iterator, _END)
        if item is _END:
            raise StopAsyncIteration
        return item


class Facade:
    """A sync ``Sandbox``, ``SandboxProcess`` or ``SandboxStream`` with awaitable methods."""

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __repr__(self) -> str:
        return repr(self._target)

    def __getattr__(self, name: str) -> Any:
        target = self._target
        if name.startswith("_") and not hasattr(target, name):
            # What the tests peek at lives in the asyncio object the sync one wraps.
            inner = next(vars(target)[slot] for slot in ("_sandbox", "_process", "_stream") if slot in vars(target))
            return getattr(inner, name)
        value = getattr(target, name)
        if inspect.isgeneratorfunction(value):  # iter_file: the iterator is made at once, each chunk waits

            def iterate(*args: Any, **kwargs: Any) -> AsyncIteratorFacade:
                return AsyncIteratorFacade(value(*args, **kwargs))

            return iterate
        if callable(value):

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await _in_thread(functools.partial(value, *args, **kwargs))

            return call
        return _wrap(value)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __aiter__(self) -> AsyncIteratorFacade:
        return AsyncIteratorFacade(iter(self._target))


class Opening:
    """What ``Client.create``/``attach`` return on "sync": awaitable, and an async context manager."""

    def __init__(self, open_: Callable[[], sandbox_sync.Sandbox]) -> None:
        self._open = open_
        self._sandbox: Facade | None = None

    def __await__(self) -> Generator[Any, None, Facade]:
        return self._opened().__await__()

    async def _opened(self) -> Facade:
        sandbox = await _in_thread(self._open)
        assert isinstance(sandbox, Facade)
        return sandbox

    async def __aenter__(self) -> Facade:
        self._sandbox = await self._opened()
        return self._sandbox

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._sandbox is not None
        await anyio.to_thread.run_sync(self._sandbox._target.__exit__, exc_type, exc, tb)
