"""Blocking ``Sandbox``, ``SandboxProcess`` and ``SandboxStream``: each call is one call of the async API.

Every method runs the same method of a :class:`sandbox_asyncio.Sandbox` (or of
its process or stream) on the shared background loop and waits for it, with
the same arguments, the same defaults and the same exceptions. Nothing here
decides anything about the protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator, Mapping
from types import TracebackType
from typing import Literal, Self, Unpack

import sandbox_asyncio
from _sandbox_anyio import DEFAULT_KILL_TIMEOUT, DEFAULT_WAIT_TIMEOUT, AttachOptions, CreateOptions
from _sandbox_anyio._process import DEFAULT_STDIN_TIMEOUT
from _sandbox_anyio._sandbox import DEFAULT_CHECKPOINT_TIMEOUT, DEFAULT_EXEC_TIMEOUT, DEFAULT_SNAPSHOT_TIMEOUT
from sandbox_proto import RunResult, SandboxException

from ._loop import loop

#: The transports of ``sandbox_asyncio`` that open their own connection (``session=``
#: and a ``Transport`` object of yours would belong to your loop, not to ours).
TransportName = Literal["websockets", "aiohttp"]


def _refuse_session(options: Mapping[str, object]) -> None:
    if "session" in options:
        raise TypeError(
            "sandbox_sync takes no session=: an aiohttp session belongs to its own event loop "
            "(use transport='aiohttp', or sandbox_asyncio with your session)"
        )


async def _opened(opening: Awaitable[sandbox_asyncio.Sandbox]) -> sandbox_asyncio.Sandbox:
    return await opening


class SandboxStream:
    """Output of one stream (stdout or stderr) of a process, read by blocking calls.

    ``for line in stream`` yields lines (with their ``\\n``; the last may lack
    it), waiting at most :attr:`read_timeout` for each; :meth:`read` returns
    chunks as they arrive; :meth:`read_all` everything until the process ends.
    """

    def __init__(self, stream: sandbox_asyncio.SandboxStream) -> None:
        self._stream = stream

    def __repr__(self) -> str:
        return repr(self._stream)

    @property
    def name(self) -> str:
        """``"stdout"`` or ``"stderr"``."""
        return self._stream.name

    @property
    def read_timeout(self) -> float | None:
        """How long iterating waits for each line, in seconds (``None``: no limit); default 600."""
        return self._stream.read_timeout

    @read_timeout.setter
    def read_timeout(self, value: float | None) -> None:
        self._stream.read_timeout = value

    @property
    def at_eof(self) -> bool:
        """``True`` once the stream has ended and everything in it was read."""
        return self._stream.at_eof

    def read(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """The next chunk of output, or ``""`` at end of stream."""
        return loop.call(lambda: self._stream.read(timeout=timeout))

    def readline(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """One line with its ``\\n``; the last line of the stream may lack it; ``""`` at end."""
        return loop.call(lambda: self._stream.readline(timeout=timeout))

    def read_all(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """Everything until the process ends (what was already read is not repeated)."""
        return loop.call(lambda: self._stream.read_all(timeout=timeout))

    def __iter__(self) -> Iterator[str]:
        while line := self.readline(timeout=self._stream.read_timeout):
            yield line


class SandboxProcess:
    """One exec in a sandbox: its output streams, stdin, exit and kill."""

    def __init__(self, process: sandbox_asyncio.SandboxProcess) -> None:
        self._process = process
        #: The process's standard output, a :class:`SandboxStream`.
        self.stdout = SandboxStream(process.stdout)
        #: The process's standard error, a :class:`SandboxStream`.
        self.stderr = SandboxStream(process.stderr)

    def __repr__(self) -> str:
        return repr(self._process)

    @property
    def exec_id(self) -> int:
        """This exec's number within its sandbox object (1, 2, ...)."""
        return self._process.exec_id

    @property
    def returncode(self) -> int | None:
        """The exit status reported by the server (``exit_code`` extension), else ``None``."""
        return self._process.returncode

    @property
    def done(self) -> bool:
        """``True`` once the process has ended."""
        return self._process.done

    @property
    def output_may_be_incomplete(self) -> bool:
        """``True`` once output may have been lost (reconnect to a server without ``seq``)."""
        return self._process.output_may_be_incomplete

    @property
    def stdin_may_be_incomplete(self) -> bool:
        """``True`` once stdin may not all have reached the process (a drop, server without ``stdin_seq``)."""
        return self._process.stdin_may_be_incomplete

    def wait(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> int | None:
        """Wait for the process to end; returns :attr:`returncode` (``None`` if unknown)."""
        return loop.call(lambda: self._process.wait(timeout=timeout))

    def write_to_stdin(self, data: str, *, timeout: float | None = DEFAULT_STDIN_TIMEOUT) -> None:
        """Send ``data`` verbatim to the process's stdin (add ``\\n`` for line readers)."""
        loop.call(lambda: self._process.write_to_stdin(data, timeout=timeout))

    def close_stdin(self, *, timeout: float | None = DEFAULT_STDIN_TIMEOUT) -> None:
        """Signal end-of-file on stdin (needs the server's ``close_stdin`` extension)."""
        loop.call(lambda: self._process.close_stdin(timeout=timeout))

    def kill(self, *, timeout: float | None = DEFAULT_KILL_TIMEOUT) -> None:
        """Kill the process and wait for its end (see :meth:`sandbox_asyncio.SandboxProcess.kill`)."""
        loop.call(lambda: self._process.kill(timeout=timeout))


class Sandbox:
    """A sandbox of the Cloud Run Sandbox service, with blocking calls.

    Make one with :meth:`create` or :meth:`attach`; the options are those of
    ``sandbox_asyncio``. Leaving ``with`` kills the sandbox (as upstream);
    :meth:`close` detaches and leaves it running. Usable from any thread.
    """

    def __init__(self, sandbox: sandbox_asyncio.Sandbox) -> None:
        """Wrap an open asyncio sandbox that lives on ``sandbox_sync``'s loop; use :meth:`create`."""
        self._sandbox = sandbox

    @classmethod
    def create(cls, url: str, *, transport: TransportName = "websockets", **options: Unpack[CreateOptions]) -> Sandbox:
        """Create a sandbox and return once it runs. ``idle_timeout=None`` asks for no idle expiry.

        ``transport="aiohttp"`` uses aiohttp (``session=`` is not offered: a session belongs to
        the event loop it was made on, and this one runs on ``sandbox_sync``'s own).
        """
        _refuse_session(options)
        # Made here, in the caller's thread: a misspelt option raises before anything waits.
        opening = sandbox_asyncio.Sandbox.create(url, transport=transport, **options)
        return cls(loop.call(lambda: _opened(opening)))

    @classmethod
    def attach(
        cls,
        url: str,
        sandbox_id: str,
        sandbox_token: str,
        *,
        transport: TransportName = "websockets",
        **options: Unpack[AttachOptions],
    ) -> Sandbox:
        """Attach to an existing sandbox (restoring it if it was checkpointed)."""
        _refuse_session(options)
        opening = sandbox_asyncio.Sandbox.attach(url, sandbox_id, sandbox_token, transport=transport, **options)
        return cls(loop.call(lambda: _opened(opening)))

    # -- what the sandbox is

    @property
    def sandbox_id(self) -> str | None:
        """The sandbox's id; attach again with it and the token."""
        return self._sandbox.sandbox_id

    @property
    def sandbox_token(self) -> str | None:
        """The secret that lets anyone attach; never logged."""
        return self._sandbox.sandbox_token

    @property
    def state(self) -> str:
        """Where the session stands: ``"running"``, ``"reconnecting"``, ``"closed"``, ..."""
        return self._sandbox.state

    @property
    def extensions(self) -> frozenset[str]:
        """Protocol extensions the server granted on the current connection (of those asked for)."""
        return self._sandbox.extensions

    @property
    def reconnects(self) -> int:
        """Number of times the connection was re-established."""
        return self._sandbox.reconnects

    def __repr__(self) -> str:
        # Never the token: reprs end up in logs and tracebacks.
        return f"<sandbox_sync.Sandbox {self.sandbox_id or '(new)'} {self.state}>"

    # -- running code

    def exec(
        self,
        language: str,
        code: str,
        *,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> SandboxProcess:
        """Run ``code`` (``"python"`` or ``"bash"``); returns once the process has started.

        ``env`` adds environment variables and ``cwd`` sets the working directory (else ``/``),
        for this process only, as in :meth:`sandbox_asyncio.Sandbox.exec`.
        """
        return SandboxProcess(loop.call(lambda: self._sandbox.exec(language, code, timeout=timeout, env=env, cwd=cwd)))

    def run(
        self,
        language: str,
        code: str,
        *,
        stdin: str | None = None,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> RunResult:
        """Run ``code`` to its end and return its whole output and exit code.

        ``stdin`` is written to the process first; ``timeout`` bounds the whole run (the
        process is killed when it runs out); ``check=True`` raises
        :class:`~sandbox_proto.SandboxProcessError` for a known non-zero exit code.
        The details are those of :meth:`sandbox_asyncio.Sandbox.run`.
        """
        return loop.call(
            lambda: self._sandbox.run(language, code, stdin=stdin, timeout=timeout, check=check, env=env, cwd=cwd)
        )

    def kill(self, *, timeout: float | None = DEFAULT_KILL_TIMEOUT) -> None:
        """Delete the sandbox on the server and close the connection."""
        loop.call(lambda: self._sandbox.kill(timeout=timeout))

    def checkpoint(self, *, timeout: float | None = DEFAULT_CHECKPOINT_TIMEOUT) -> None:
        """Save the whole sandbox on the server; the connection ends. Attach again to continue."""
        loop.call(lambda: self._sandbox.checkpoint(timeout=timeout))

    def snapshot_filesystem(self, name: str, *, timeout: float | None = DEFAULT_SNAPSHOT_TIMEOUT) -> None:
        """Store the sandbox's files as snapshot ``name``, for ``create(filesystem_snapshot_name=...)``."""
        loop.call(lambda: self._sandbox.snapshot_filesystem(name, timeout=timeout))

    # -- files, over exec and stdin

    def write_file(self, path: str, data: bytes | str, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> None:
        """Create or replace the file at ``path`` (relative to the exec's working directory)."""
        loop.call(lambda: self._sandbox.write_file(path, data, timeout=timeout))

    def read_file(self, path: str, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> bytes:
        """The whole content of the file at ``path``."""
        return loop.call(lambda: self._sandbox.read_file(path, timeout=timeout))

    def read_text(self, path: str, *, encoding: str = "utf-8", timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> str:
        """The whole content of the file at ``path``, decoded with ``encoding``."""
        return loop.call(lambda: self._sandbox.read_text(path, encoding=encoding, timeout=timeout))

    def iter_file(self, path: str, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> Iterator[bytes]:
        """The file's content in chunks, for files too large to hold at once."""
        chunks = self._sandbox.iter_file(path, timeout=timeout)

        async def next_chunk() -> bytes | None:
            return await anext(chunks, None)

        async def close() -> None:
            await chunks.aclose()  # type: ignore[attr-defined]  # an async generator

        try:
            while (chunk := loop.call(next_chunk)) is not None:
                yield chunk
        finally:
            # Left early (break, error): end the reading process now, so the next exec finds the
            # sandbox free. From the loop's own thread (a late garbage collection) asyncio does it.
            with contextlib.suppress(RuntimeError):
                loop.call(close)

    def list_dir(self, path: str = ".", *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> list[str]:
        """The names in directory ``path``, sorted."""
        return loop.call(lambda: self._sandbox.list_dir(path, timeout=timeout))

    # -- ending

    def close(self) -> None:
        """Detach from the sandbox and leave it running; attach again with its id and token."""
        loop.call(self._sandbox.close)

    def wait_closed(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> SandboxException | None:
        """Wait until the session ends; returns why (``None`` for a deliberate end)."""
        return loop.call(lambda: self._sandbox.wait_closed(timeout=timeout))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # The async exit's rules: kill; if the block raised, a failing kill is logged, not raised.
        loop.call(lambda: self._sandbox.__aexit__(exc_type, exc, tb))
