"""The asyncio ``Sandbox``: moves frames between a transport and ``sandbox_proto``, wakes waiters."""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from collections.abc import Generator
from types import TracebackType
from typing import Any, Literal

from sandbox_proto import (
    CheckpointDone,
    ClientProtocol,
    CloseConnection,
    ExecRejected,
    ExecStarted,
    InitRequest,
    KillProcessFailed,
    KillSandboxDone,
    LocalProtocolError,
    Output,
    OutputIncomplete,
    ProcessEnded,
    Reconnected,
    ReconnectPolicy,
    ReconnectScheduled,
    SandboxConnectionError,
    SandboxException,
    SandboxStateError,
    SandboxTimeoutError,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotDone,
)

from ._process import DEFAULT_KILL_TIMEOUT, SandboxProcess, _bounded, _deadline
from ._transport import HandshakeRefused, Transport, TransportClosed, WebsocketsTransport

logger = logging.getLogger("sandbox_asyncio")
_debug_logger = logging.getLogger("sandbox.debug")

DEFAULT_CONNECT_TIMEOUT = 60.0
DEFAULT_EXEC_TIMEOUT = 30.0
DEFAULT_CHECKPOINT_TIMEOUT = 120.0
DEFAULT_SNAPSHOT_TIMEOUT = 120.0
DEFAULT_CLOSE_TIMEOUT = 5.0
#: Output held for the user per process before the socket stops being read.
DEFAULT_STREAM_BUFFER = 16 * 2**20

TransportName = Literal["websockets", "aiohttp"]


def _debug_log(enabled: bool) -> logging.Logger:
    """``enable_debug`` shows this sandbox's protocol log even when logging is not configured."""
    if not enabled:
        return logging.getLogger("sandbox_proto.client")
    if not _debug_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        _debug_logger.addHandler(handler)
        _debug_logger.setLevel(logging.DEBUG)
    return _debug_logger


def _make_transport(transport: TransportName | Transport, session: Any) -> Transport:
    if not isinstance(transport, str):
        return transport
    if transport == "websockets":
        if session is not None:
            raise ValueError("session= is for transport='aiohttp'")
        return WebsocketsTransport()
    if transport == "aiohttp":
        from ._aiohttp import AiohttpTransport  # optional dependency: the 'aiohttp' extra

        return AiohttpTransport(session)
    raise ValueError(f"unknown transport {transport!r}: use 'websockets' or 'aiohttp'")


class _Opening:
    """What ``Sandbox.create``/``attach`` return: awaitable, and an async context manager.

    ``sandbox = await Sandbox.create(url)`` and ``async with Sandbox.create(url) as sandbox``
    both work, as does the upstream ``async with await Sandbox.create(url)``.
    """

    def __init__(self, sandbox: Sandbox, timeout: float | None) -> None:
        self._sandbox = sandbox
        self._timeout = timeout

    def __await__(self) -> Generator[Any, None, Sandbox]:
        return self._sandbox._open(self._timeout).__await__()

    async def __aenter__(self) -> Sandbox:
        return await self._sandbox._open(self._timeout)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._sandbox.__aexit__(exc_type, exc, tb)


class Sandbox:
    """A sandbox of the Cloud Run Sandbox service, on asyncio.

    Make one with :meth:`create` or :meth:`attach`. Leaving ``async with``
    kills the sandbox (as upstream); :meth:`close` detaches and leaves it running.
    """

    def __init__(
        self,
        protocol: ClientProtocol,
        *,
        ssl: ssl_module.SSLContext | None,
        transport: Transport,
        stream_buffer_size: int,
    ) -> None:
        self._protocol = protocol
        self._ssl = ssl
        self._transport = transport
        self._buffer_limit = stream_buffer_size
        self._send_lock = asyncio.Lock()
        self._setup: asyncio.Future[None] | None = None
        self._process: SandboxProcess | None = None
        self._kill_waiter: asyncio.Future[None] | None = None
        self._checkpoint_waiter: asyncio.Future[None] | None = None
        self._snapshot_waiter: asyncio.Future[None] | None = None
        self._ended = asyncio.Event()
        self._end_error: SandboxException | None = None
        self._close_code: int | None = None
        self._reconnect_delay: float | None = None
        self._reader: asyncio.Task[None] | None = None
        #: Number of times the connection was re-established.
        self.reconnects = 0

    # ------------------------------------------------------------------
    # construction

    @classmethod
    def create(
        cls,
        url: str,
        *,
        idle_timeout: float | None = 60,
        enable_sandbox_checkpoint: bool = False,
        enable_idle_timeout_auto_checkpoint: bool = False,
        enable_sandbox_handoff: bool = False,
        filesystem_snapshot_name: str | None = None,
        enable_debug: bool = False,
        debug_label: str = "",
        ssl: ssl_module.SSLContext | None = None,
        enable_auto_reconnect: bool = False,
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        headers: dict[str, str] | None = None,
        transport: TransportName | Transport = "websockets",
        session: Any = None,
        reconnect_policy: ReconnectPolicy | None = None,
        stream_buffer_size: int = DEFAULT_STREAM_BUFFER,
    ) -> _Opening:
        """Create a sandbox. ``idle_timeout=None`` asks for no idle expiry."""
        init = InitRequest(
            idle_timeout=idle_timeout,
            enable_checkpoint=enable_sandbox_checkpoint,
            enable_idle_timeout_auto_checkpoint=enable_idle_timeout_auto_checkpoint,
            enable_sandbox_handoff=enable_sandbox_handoff,
            filesystem_snapshot_name=filesystem_snapshot_name,
            send_null_idle_timeout=idle_timeout is None,
        )
        protocol = ClientProtocol(
            url,
            init=init,
            auto_reconnect=enable_auto_reconnect,
            reconnect_policy=reconnect_policy,
            headers=headers,
            label=debug_label,
            log=_debug_log(enable_debug),
        )
        sandbox = cls(
            protocol, ssl=ssl, transport=_make_transport(transport, session), stream_buffer_size=stream_buffer_size
        )
        return _Opening(sandbox, timeout)

    @classmethod
    def attach(
        cls,
        url: str,
        sandbox_id: str,
        sandbox_token: str,
        *,
        enable_debug: bool = False,
        debug_label: str = "",
        ssl: ssl_module.SSLContext | None = None,
        enable_auto_reconnect: bool = False,
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        headers: dict[str, str] | None = None,
        transport: TransportName | Transport = "websockets",
        session: Any = None,
        reconnect_policy: ReconnectPolicy | None = None,
        stream_buffer_size: int = DEFAULT_STREAM_BUFFER,
    ) -> _Opening:
        """Attach to an existing sandbox (restoring it if it was checkpointed)."""
        protocol = ClientProtocol(
            url,
            sandbox_id=sandbox_id,
            sandbox_token=sandbox_token,
            auto_reconnect=enable_auto_reconnect,
            reconnect_policy=reconnect_policy,
            headers=headers,
            label=debug_label,
            log=_debug_log(enable_debug),
        )
        sandbox = cls(
            protocol, ssl=ssl, transport=_make_transport(transport, session), stream_buffer_size=stream_buffer_size
        )
        return _Opening(sandbox, timeout)

    async def _open(self, timeout: float | None) -> Sandbox:
        if self._setup is not None:
            raise SandboxStateError("this sandbox object is already open")
        self._setup = asyncio.get_running_loop().create_future()
        try:
            async with _deadline(timeout, "opening the sandbox"):
                await self._connect(timeout)
                await asyncio.shield(self._setup)
        except SandboxTimeoutError:
            self._protocol.operation_timed_out("opening the sandbox")
            await self._settle()
            raise
        except BaseException:
            await self._settle()
            raise
        return self

    async def _connect(self, timeout: float | None) -> None:
        """Open a WebSocket as the core says; on success start reading it."""
        handshake = self._protocol.handshake()
        self._protocol._debug("connecting to %s", handshake.safe_url)
        open_timeout = min(timeout or DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)
        try:
            cookies = await self._transport.connect(
                handshake.url, handshake.headers, ssl=self._ssl, timeout=open_timeout
            )
        except SandboxConnectionError as exc:
            status = exc.http_status if isinstance(exc, HandshakeRefused) else None
            self._protocol.connection_failed(exc, now=_now(), http_status=status)
            self._dispatch()
            return
        self._protocol.connection_opened(cookies)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="sandbox-reader")
        await self._flush()

    # ------------------------------------------------------------------
    # the loop

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    text = await self._transport.recv()
                except TransportClosed as closed:
                    self._protocol.connection_closed(closed.code, closed.reason, now=_now())
                    self._dispatch()
                    if self._reconnect_delay is None:
                        return
                    await self._reconnect()
                    return  # a new reader runs on the new connection
                self._protocol.receive(text)
                self._dispatch()
                await self._flush()
                process = self._process
                if process is not None and not process.done:
                    # Back-pressure: stop reading the socket while the user's buffer is full.
                    await process._space.wait()
                if self._close_code is not None:
                    await self._close_transport()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: never leave waiters hanging
            logger.exception("sandbox reader failed")
            self._protocol.connection_closed(1006, f"internal error: {exc}", now=_now())
            self._protocol.close()
            self._dispatch()

    async def _reconnect(self) -> None:
        while self._reconnect_delay is not None:
            delay, self._reconnect_delay = self._reconnect_delay, None
            if delay:
                await asyncio.sleep(delay)
            if self._ended.is_set():
                return
            await self._connect(DEFAULT_CONNECT_TIMEOUT)
            if self._reader is not None and not self._reader.done() and self._reader is not asyncio.current_task():
                return

    async def _flush(self) -> None:
        """Send what the core queued, in order, from whichever task gets here."""
        async with self._send_lock:
            while frames := self._protocol.data_to_send():
                for text in frames:
                    try:
                        await self._transport.send(text)
                    except TransportClosed:
                        # The reader sees the close and lets the core decide what follows.
                        logger.debug("send on a closed connection dropped")
                        return
        if self._close_code is not None:
            await self._close_transport()

    async def _close_transport(self) -> None:
        code, self._close_code = self._close_code, None
        if code is None:
            return
        try:
            await asyncio.wait_for(self._transport.close(code), DEFAULT_CLOSE_TIMEOUT)
        except (TimeoutError, OSError, TransportClosed):
            logger.debug("closing the transport failed", exc_info=True)

    def _dispatch(self) -> None:
        """Turn the core's events into wake-ups."""
        for event in self._protocol.events():
            process = self._process
            if isinstance(event, Output):
                if process is not None and process.exec_id == event.exec_id:
                    process._feed(event.stream, event.data)
            elif isinstance(event, ExecStarted):
                if process is not None and process.exec_id == event.exec_id:
                    process._set_started()
            elif isinstance(event, ProcessEnded | ExecRejected):
                if process is not None and process.exec_id == event.exec_id:
                    returncode = event.returncode if isinstance(event, ProcessEnded) else None
                    process._finish(returncode, event.error)
            elif isinstance(event, OutputIncomplete):
                if process is not None and process.exec_id == event.exec_id:
                    process.output_may_be_incomplete = True
            elif isinstance(event, KillProcessFailed):
                if process is not None and process.exec_id == event.exec_id:
                    process._kill_failed(event.error)
            elif isinstance(event, SetupComplete):
                _resolve(self._setup, None)
            elif isinstance(event, SetupFailed):
                _resolve(self._setup, event.error)
            elif isinstance(event, KillSandboxDone):
                _resolve(self._kill_waiter, event.error)
            elif isinstance(event, CheckpointDone):
                _resolve(self._checkpoint_waiter, event.error)
            elif isinstance(event, SnapshotDone):
                _resolve(self._snapshot_waiter, event.error)
            elif isinstance(event, ReconnectScheduled):
                self._reconnect_delay = event.delay
            elif isinstance(event, Reconnected):
                self.reconnects += 1
                logger.info("reconnected to sandbox %s%s", self.sandbox_id, " (restored)" if event.restored else "")
            elif isinstance(event, CloseConnection):
                self._close_code = event.code
            elif isinstance(event, SessionEnded):
                self._end_error = event.error
                self._ended.set()
                error = event.error or SandboxStateError(f"the sandbox is {self._protocol.state.value}")
                _resolve(self._setup, error)

    async def _settle(self) -> None:
        """After the session ended: close the socket and stop the reader."""
        self._dispatch()
        if self._close_code is None and self._protocol.is_ended:
            self._close_code = 1000
        await self._close_transport()
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise
            except Exception:
                logger.debug("reader ended with an error", exc_info=True)

    # ------------------------------------------------------------------
    # public API

    @property
    def sandbox_id(self) -> str | None:
        return self._protocol.sandbox_id

    @property
    def sandbox_token(self) -> str | None:
        """The secret that lets anyone attach; never logged."""
        return self._protocol.sandbox_token

    @property
    def state(self) -> str:
        return self._protocol.state.value

    @property
    def extensions(self) -> frozenset[str]:
        """Protocol extensions the server advertised on the current connection."""
        return self._protocol.extensions

    def __repr__(self) -> str:
        return f"<Sandbox {self.sandbox_id or '(new)'} {self.state}>"

    async def exec(self, language: str, code: str, *, timeout: float | None = DEFAULT_EXEC_TIMEOUT) -> SandboxProcess:
        """Run ``code`` (``"python"`` or ``"bash"``); returns once the process has started."""
        try:
            exec_id = self._protocol.exec(language, code)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        process = SandboxProcess(self, exec_id, self._buffer_limit)
        self._process = process
        try:
            async with _deadline(timeout, "starting the exec"):
                await self._flush()
                await asyncio.shield(process._started)
        except SandboxTimeoutError:
            self._protocol.operation_timed_out("starting the exec")
            await self._settle()
            raise
        return process

    async def kill(self, *, timeout: float | None = DEFAULT_KILL_TIMEOUT) -> None:
        """Delete the sandbox on the server and close the connection."""
        if self._ended.is_set():
            await self._settle()
            return
        self._kill_waiter = asyncio.get_running_loop().create_future()
        self._protocol.kill_sandbox()
        self._dispatch()
        try:
            async with _deadline(timeout, "killing the sandbox"):
                await self._flush()
                await asyncio.shield(self._kill_waiter)
        except SandboxTimeoutError:
            self._protocol.kill_sandbox_timed_out()
        finally:
            await self._settle()

    async def checkpoint(self, *, timeout: float | None = DEFAULT_CHECKPOINT_TIMEOUT) -> None:
        """Save the whole sandbox on the server; the connection ends. Attach again to continue."""
        try:
            self._protocol.checkpoint()
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        self._checkpoint_waiter = asyncio.get_running_loop().create_future()
        try:
            async with _deadline(timeout, "checkpointing"):
                await self._flush()
                await asyncio.shield(self._checkpoint_waiter)
        except SandboxTimeoutError:
            self._protocol.operation_timed_out("checkpoint")
            await self._settle()
            raise
        finally:
            if self._protocol.is_ended:
                await self._settle()

    async def snapshot_filesystem(self, name: str, *, timeout: float | None = DEFAULT_SNAPSHOT_TIMEOUT) -> None:
        """Store the sandbox's files as snapshot ``name``, for ``create(filesystem_snapshot_name=...)``."""
        try:
            self._protocol.snapshot_filesystem(name)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        self._snapshot_waiter = asyncio.get_running_loop().create_future()
        try:
            async with _deadline(timeout, "snapshotting the filesystem"):
                await self._flush()
                await asyncio.shield(self._snapshot_waiter)
        except SandboxTimeoutError:
            self._protocol.snapshot_timed_out()
            raise

    async def close(self) -> None:
        """Detach from the sandbox and leave it running; attach again with its id and token."""
        self._protocol.close()
        await self._settle()

    async def wait_closed(self, *, timeout: float | None = None) -> SandboxException | None:
        """Wait until the session ends; returns why (``None`` for a deliberate end)."""
        await _bounded(self._ended.wait(), timeout, "waiting for the session to end")
        return self._end_error

    async def __aenter__(self) -> Sandbox:
        if self._setup is None:
            raise SandboxStateError("open the sandbox first: async with await Sandbox.create(...)")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.kill()


def _resolve(waiter: asyncio.Future[None] | None, error: SandboxException | None) -> None:
    if waiter is None or waiter.done():
        return
    if error is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(error)
        waiter.exception()  # mark retrieved: the caller may have timed out already


def _now() -> float:
    return asyncio.get_running_loop().time()
