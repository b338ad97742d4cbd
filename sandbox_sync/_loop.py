"""The one background event loop that every ``sandbox_sync`` call crosses over to (private).

A daemon thread runs an asyncio loop. It starts with the first call, is shared
by every sandbox of the process (so a sandbox made in one thread works from
any other), and is stopped at interpreter exit.

Each call is one ``asyncio.run_coroutine_threadsafe``: two thread crossings
(there, and the result back). anyio's ``BlockingPortal.call`` does the same job
with three (it also waits for the task to be spawned) and measured twice the
cost per call (about 150 us against 70 us on the benchmark machine); an exec
round trip is three calls, so that difference was most of the overhead.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

#: How long interpreter exit waits for the loop to wind down (its sockets are dropped anyway).
SHUTDOWN_TIMEOUT = 5.0


class LoopThread:
    """An asyncio loop on a daemon thread, and the blocking way to run a coroutine on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        running = self._loop
        if running is not None:
            return running
        with self._lock:
            if self._loop is None:
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        ready: Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = Future()

        async def serve() -> None:
            stopping = asyncio.Event()
            ready.set_result((asyncio.get_running_loop(), stopping))
            await stopping.wait()
            # asyncio.run then cancels what still runs (sandboxes left open) and closes the loop.

        def run() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:  # handed to the thread waiting in _start, if it still waits
                if not ready.done():
                    ready.set_exception(exc)
                raise

        # Daemon: a script that never closes its sandboxes must still exit (a non-daemon thread,
        # like the executor thread of anyio's start_blocking_portal, is joined before atexit runs).
        thread = threading.Thread(target=run, name="sandbox_sync", daemon=True)
        thread.start()
        self._loop, self._stopping = ready.result()
        self._thread = thread

    def call(self, function: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``function()`` on the loop and block until it returns (or raises) here.

        An interrupt while waiting (Ctrl-C) cancels the call on the loop, as a
        cancelled task would be: the sandbox stays usable.
        """
        thread = self._thread
        if thread is not None and thread.ident == threading.get_ident():
            raise RuntimeError(
                "sandbox_sync was called from its own event loop (an async callback such as a token "
                "provider?): use sandbox_asyncio there"
            )
        future = asyncio.run_coroutine_threadsafe(function(), self._get_loop())
        try:
            return future.result()
        except BaseException:
            future.cancel()  # a no-op once it finished; else the call is cancelled on the loop
            raise

    def stop(self) -> None:
        """Stop the loop: what still runs on it is cancelled, open sockets are dropped."""
        with self._lock:
            running, stopping, thread = self._loop, self._stopping, self._thread
            self._loop = self._stopping = self._thread = None
        if running is None or stopping is None or thread is None:
            return
        try:
            running.call_soon_threadsafe(stopping.set)
        except RuntimeError:  # the loop already ended
            return
        thread.join(SHUTDOWN_TIMEOUT)

    def _forget(self) -> None:
        """In a forked child: the parent's loop thread does not exist here; start afresh."""
        self._lock = threading.Lock()
        self._loop = self._stopping = self._thread = None


loop = LoopThread()
atexit.register(loop.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=loop._forget)
