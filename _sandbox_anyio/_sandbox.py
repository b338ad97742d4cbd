"""The runtime-neutral sandbox driver: moves frames between a transport and ``sandbox_proto``.

Written on anyio, so one implementation serves asyncio and trio. What differs
per runtime is small and injected: the transport, how a background task is
started (an asyncio task, or a trio nursery), and the :class:`Runtime` whose
native deadlines, events and clock the hot path uses instead of anyio's.

The transport calls the driver (:meth:`BaseSandbox.message_received`) as each
message arrives; the driver feeds the core and wakes whoever waits, so a
reply reaches its caller in one task switch. Background tasks are only for
what must wait: sending a reply the core queued, and reconnecting.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import ssl as ssl_module
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping
from types import TracebackType
from typing import Any, ClassVar, Self, TypedDict

import anyio

from sandbox_proto import (
    CLIENT_EXTENSIONS,
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
    RunResult,
    SandboxConnectionError,
    SandboxException,
    SandboxStateError,
    SandboxTimeoutError,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotDone,
    StdinIncomplete,
    check_exec_arguments,
    wrap_code,
)

from . import _files, _run
from ._auth import TokenProvider, fetch_token, google_id_token_provider
from ._process import (
    DEFAULT_KILL_TIMEOUT,
    DEFAULT_WAIT_TIMEOUT,
    Flag,
    Outcome,
    SandboxProcess,
    SendLock,
    Wakeup,
)
from ._runtime import ANYIO, Runtime, deadline
from ._transport import CLOSE_TIMEOUT, HandshakeRefused, Spawn, Transport, TransportClosed

logger = logging.getLogger("sandbox")
_debug_logger = logging.getLogger("sandbox.debug")

DEFAULT_CONNECT_TIMEOUT = 60.0
DEFAULT_EXEC_TIMEOUT = 30.0
DEFAULT_CHECKPOINT_TIMEOUT = 120.0
DEFAULT_SNAPSHOT_TIMEOUT = 120.0
#: Output held for the user per process before the socket stops being read.
DEFAULT_STREAM_BUFFER = 16 * 2**20

_PROCESS_EVENTS = (
    Output,
    ExecStarted,
    ProcessEnded,
    ExecRejected,
    OutputIncomplete,
    StdinIncomplete,
    KillProcessFailed,
)


class _StderrUnlessConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to stderr only while the application has configured no logging of its own.

    Once it has (a root handler), the records reach the application's handlers
    by propagation; writing them here too would print every line twice.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def debug_log(enabled: bool) -> logging.Logger:
    """``enable_debug`` shows this sandbox's protocol log even when logging is not configured."""
    if not enabled:
        return logging.getLogger("sandbox_proto.client")
    if not _debug_logger.handlers:
        handler = _StderrUnlessConfigured()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        _debug_logger.addHandler(handler)
        _debug_logger.setLevel(logging.DEBUG)
    return _debug_logger


class AttachOptions(TypedDict, total=False):
    """Options of ``Sandbox.attach`` on every runtime (defaults in the README's table)."""

    enable_debug: bool
    debug_label: str
    ssl: ssl_module.SSLContext | None
    enable_auto_reconnect: bool
    timeout: float | None
    headers: dict[str, str] | None
    reconnect_policy: ReconnectPolicy | None
    stream_buffer_size: int
    token_provider: TokenProvider | None
    use_google_auth: bool
    #: Keepalive: a ping every ``ping_interval`` seconds, the connection declared dead when
    #: no pong comes within ``ping_timeout`` (``None`` turns either off).
    ping_interval: float | None
    ping_timeout: float | None
    #: Protocol extensions to ask the server for (default: every one this client implements);
    #: ``()`` asks for none, so the connection speaks exactly the upstream protocol.
    extensions: Collection[str]


class CreateOptions(AttachOptions, total=False):
    """Options of ``Sandbox.create``: those of attach, plus what shapes a new sandbox."""

    idle_timeout: float | None
    enable_sandbox_checkpoint: bool
    enable_idle_timeout_auto_checkpoint: bool
    enable_sandbox_handoff: bool
    filesystem_snapshot_name: str | None


#: Keyword arguments the runtime packages take beside the options: named when one is misspelt.
_RUNTIME_KEYWORDS = ("transport", "session", "nursery")


def check_options(call: str, options: Mapping[str, object], valid: frozenset[str]) -> None:
    """Refuse an unknown option with a :class:`TypeError` naming the nearest valid one.

    Options arrive as ``**options``: without this a misspelt ``idle_timout=5``
    would be ignored silently and the sandbox created with the default.
    """
    for name in options:
        if name in valid:
            continue
        message = f"{call}() got an unexpected keyword argument {name!r}"
        if name in _CREATE_KEYS:
            raise TypeError(f"{message}: {name} is an option of Sandbox.create() only")
        close = difflib.get_close_matches(name, [*sorted(valid), *_RUNTIME_KEYWORDS], n=1)
        if close:
            raise TypeError(f"{message}; did you mean {close[0]!r}?")
        raise TypeError(f"{message}; the options are {', '.join(sorted(valid))}")


_ATTACH_KEYS = frozenset(AttachOptions.__optional_keys__ | AttachOptions.__required_keys__)
_CREATE_KEYS = frozenset(CreateOptions.__optional_keys__ | CreateOptions.__required_keys__)


def _client_protocol(url: str, options: AttachOptions, **identity: Any) -> ClientProtocol:
    return ClientProtocol(
        url,
        auto_reconnect=options.get("enable_auto_reconnect", False),
        reconnect_policy=options.get("reconnect_policy"),
        headers=options.get("headers"),
        label=options.get("debug_label", ""),
        log=debug_log(options.get("enable_debug", False)),
        extensions=options.get("extensions", CLIENT_EXTENSIONS),
        **identity,
    )


def create_protocol(url: str, options: CreateOptions) -> ClientProtocol:
    """The core for ``Sandbox.create``, from the options of the upstream client.

    Every runtime calls it first, so an unknown option is refused here for all.
    """
    check_options("Sandbox.create", options, _CREATE_KEYS)
    idle_timeout = options.get("idle_timeout", 60)
    init = InitRequest(
        idle_timeout=idle_timeout,
        enable_checkpoint=options.get("enable_sandbox_checkpoint", False),
        enable_idle_timeout_auto_checkpoint=options.get("enable_idle_timeout_auto_checkpoint", False),
        enable_sandbox_handoff=options.get("enable_sandbox_handoff", False),
        filesystem_snapshot_name=options.get("filesystem_snapshot_name"),
        send_null_idle_timeout=idle_timeout is None,
    )
    return _client_protocol(url, options, init=init)


def attach_protocol(url: str, sandbox_id: str, sandbox_token: str, options: AttachOptions) -> ClientProtocol:
    """The core for ``Sandbox.attach``; an unknown option raises :class:`TypeError`."""
    check_options("Sandbox.attach", options, _ATTACH_KEYS)
    return _client_protocol(url, options, sandbox_id=sandbox_id, sandbox_token=sandbox_token)


def open_timeout(options: AttachOptions) -> float | None:
    return options.get("timeout", DEFAULT_CONNECT_TIMEOUT)


class _WeakReceiver:
    """What the transport calls: it must not keep a sandbox its user has dropped alive."""

    __slots__ = ("_sandbox",)

    def __init__(self, sandbox: BaseSandbox) -> None:
        self._sandbox = weakref.ref(sandbox)

    def message_received(self, message: str | bytes) -> None:
        if (sandbox := self._sandbox()) is not None:
            sandbox.message_received(message)

    def connection_lost(self, code: int, reason: str) -> None:
        if (sandbox := self._sandbox()) is not None:
            sandbox.connection_lost(code, reason)


def _abandon(spawn_detached: Spawn, transport: Transport) -> None:
    """Run when a sandbox is collected while connected: drop its socket (the sandbox stays on the server)."""
    logger.info("a sandbox was dropped without close() or kill(): closing its connection")
    with contextlib.suppress(RuntimeError):  # the event loop is already gone: so is the socket
        spawn_detached(transport.abort)


class BaseSandbox:
    """A sandbox of the Cloud Run Sandbox service; see the runtime packages for construction.

    Leaving ``async with`` kills the sandbox (as upstream); :meth:`close`
    detaches and leaves it running.
    """

    #: The event loop's primitives for the hot path; each runtime package sets its own.
    _runtime: ClassVar[Runtime] = ANYIO

    def __init__(self, url: str, protocol: ClientProtocol, transport: Transport, options: AttachOptions) -> None:
        runtime = self._runtime
        token_provider = options.get("token_provider")
        if options.get("use_google_auth") and token_provider is None:
            token_provider = google_id_token_provider(url)
        self._token_provider = token_provider
        self._protocol = protocol
        self._ssl = options.get("ssl")
        self._transport = transport
        self._buffer_limit = options.get("stream_buffer_size", DEFAULT_STREAM_BUFFER)
        # Uncontended, taking it costs no event-loop round; and no deque per sandbox.
        self._send_lock = SendLock(runtime)
        self._spawn: Spawn | None = None
        self._setup: Outcome | None = None
        self._process: SandboxProcess | None = None
        # Made by the call that waits for them: an idle sandbox holds none.
        self._kill_outcome: Outcome | None = None
        self._checkpoint_outcome: Outcome | None = None
        self._snapshot_outcome: Outcome | None = None
        self._ended = Flag(runtime)
        self._end_error: SandboxException | None = None
        self._close_code: int | None = None
        self._close_abort = False
        self._reconnect_delay: float | None = None
        self._reading_paused = False
        #: The last output filled the user's buffers: reading may have to pause.
        self._buffers_filled = False
        self._flush_scheduled = False
        #: Woken whenever the background writer has sent all it could.
        self._writer_idle = Wakeup(runtime)
        #: The reconnecting task, while one runs.
        self._reconnect_scope: anyio.CancelScope | None = None
        self._reconnect_done: Flag | None = None
        #: Closes the socket if this object is collected without close() or kill().
        self._finalizer: weakref.finalize[Any, Any] | None = None
        #: Number of times the connection was re-established.
        self.reconnects = 0

    # ------------------------------------------------------------------
    # opening

    async def _open(self, spawn: Spawn, timeout: float | None, *, spawn_detached: Spawn) -> Self:
        """Open the sandbox; ``spawn`` starts its background tasks.

        ``spawn_detached`` starts a task from any thread without holding this
        object: a sandbox dropped without ``close()`` is collected, and its
        socket is closed then, so it does not stay attached.
        """
        if self._setup is not None:
            raise SandboxStateError("this sandbox object is already open")
        self._finalizer = weakref.finalize(self, _abandon, spawn_detached, self._transport)
        self._spawn = spawn
        self._setup = Outcome(self._runtime)
        try:
            with deadline(timeout, "opening the sandbox"):
                await self._connect(timeout)
                await self._setup.wait()
        except SandboxTimeoutError:
            self._protocol.operation_timed_out("opening the sandbox")
            await self._settle()
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._settle()
            raise
        return self

    async def _connect(self, timeout: float | None) -> None:
        """Open a WebSocket as the core says; on success start reading it."""
        handshake = self._protocol.handshake()
        self._protocol._debug("connecting to %s", handshake.safe_url)
        open_timeout = min(timeout or DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)
        headers = handshake.headers
        try:
            if self._token_provider is not None:
                token = await fetch_token(self._token_provider, timeout=open_timeout)
                headers = {**headers, "Authorization": f"Bearer {token}"}
            cookies = await self._transport.connect(handshake.url, headers, ssl=self._ssl, timeout=open_timeout)
        except SandboxConnectionError as exc:
            status = exc.http_status if isinstance(exc, HandshakeRefused) else None
            self._protocol.connection_failed(exc, now=self._runtime.now(), http_status=status)
            self._dispatch()
            return
        self._protocol.connection_opened(cookies)
        self._dispatch()
        if self._close_code is not None:
            # The session ended while this handshake was in flight: never leave the socket attached.
            with anyio.CancelScope(shield=True):
                await self._close_transport()
            return
        self._reading_paused = False
        assert self._spawn is not None
        self._transport.start(_WeakReceiver(self), self._spawn)
        await self._flush()

    # ------------------------------------------------------------------
    # called by the transport

    def message_received(self, message: str | bytes) -> None:
        try:
            self._protocol.receive(message)
            self._dispatch()
        except Exception as exc:  # a bug of ours: never leave waiters hanging
            self._fail(exc)
            return
        if self._protocol.has_data_to_send or self._close_code is not None:
            self._schedule_flush()
        if self._buffers_filled:
            self._buffers_filled = False
            process = self._process
            if process is not None and process._buffers_full and not self._reading_paused:
                # Back-pressure: stop reading the socket while the user's buffers are full.
                self._reading_paused = True
                self._transport.pause_reading()

    def connection_lost(self, code: int, reason: str) -> None:
        if self._send_lock.busy:
            # A send in progress reports first which of its frames did not leave (send_failed);
            # only then may the core decide what the close means for them.
            self._background(lambda: self._lost_after_send(code, reason))
            return
        self._lost(code, reason)

    async def _lost_after_send(self, code: int, reason: str) -> None:
        with anyio.CancelScope(shield=True):
            async with self._send_lock:
                self._lost(code, reason)

    def _lost(self, code: int, reason: str) -> None:
        try:
            self._protocol.connection_closed(code, reason, now=self._runtime.now())
            self._dispatch()
        except Exception as exc:
            self._fail(exc)
            return
        if self._reconnect_delay is not None and self._reconnect_done is None:
            self._reconnect_done = Flag(self._runtime)
            self._background(self._run_reconnect)

    def _resume_reading(self) -> None:
        """The user's reads made room in the buffers."""
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def _fail(self, exc: Exception) -> None:
        logger.exception("sandbox driver failed")
        self._protocol.connection_closed(1006, f"internal error: {exc}", now=self._runtime.now())
        self._protocol.close()
        self._dispatch()
        self._close_abort = True
        self._background(self._close_transport)

    def _background(self, function: Callable[[], Coroutine[Any, Any, None]]) -> None:
        assert self._spawn is not None
        self._spawn(function)

    async def _flush_soon(self) -> None:
        """The background writer: sends what the core queued, shielded from every caller's deadline."""
        self._flush_scheduled = False
        try:
            with self._runtime.shield():
                await self._send_queued()
                await self._close_transport()
        except Exception:
            logger.exception("sending failed")
        finally:
            self._writer_idle.set()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._background(self._flush_soon)

    async def _run_reconnect(self) -> None:
        done = self._reconnect_done
        assert done is not None
        try:
            with anyio.CancelScope() as self._reconnect_scope:
                await self._reconnect()
        finally:
            self._reconnect_scope = None
            self._reconnect_done = None
            done.set()

    async def _reconnect(self) -> None:
        while (delay := self._reconnect_delay) is not None:
            self._reconnect_delay = None
            if delay:
                await anyio.sleep(delay)
            if self._ended.is_set:
                return
            await self._connect(DEFAULT_CONNECT_TIMEOUT)

    async def _flush(self) -> None:
        """Send what the core queued, in order; returns once it is handed to the transport.

        Where cancelling a send could leave half a frame on the wire, a
        background writer sends and the caller only waits for it, so a
        caller's deadline never interrupts a frame.
        """
        if self._transport.cancel_safe_send:
            await self._send_queued()
            if self._close_code is None:
                return
            # Closing is the background writer's, shielded there: on asyncio the caller's deadline
            # is native, and anyio's shields do not hold it back (see _runtime).
        while self._protocol.has_data_to_send or self._flush_scheduled or self._close_code is not None:
            self._schedule_flush()
            await self._writer_idle.wait()

    async def _send_queued(self) -> None:
        lock = self._send_lock
        await lock.acquire()
        try:
            while frames := self._protocol.data_to_send():
                for index, text in enumerate(frames):
                    try:
                        await self._transport.send(text)
                    except TransportClosed:
                        # This frame may or may not have left; the later ones did not.
                        self._protocol.send_failed(frames[index + 1 :])
                        logger.debug("send on a closed connection dropped")
                        return
                    except BaseException:
                        # Cancelled after the frame was written whole (cancel_safe_send): the rest
                        # go first again, from the background writer, and nobody's data is lost.
                        self._protocol.send_failed(frames[index + 1 :])
                        if self._protocol.has_data_to_send:
                            self._schedule_flush()
                        raise
        finally:
            lock.release()

    async def _close_transport(self) -> None:
        code, self._close_code = self._close_code, None
        if code is None:
            return
        if self._close_abort:
            # After a timeout the peer is not answering: a closing handshake would only wait.
            with anyio.CancelScope(shield=True):
                await self._transport.abort()
            return
        with anyio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._transport.close(code)
            except (OSError, TransportClosed):
                logger.debug("closing the transport failed", exc_info=True)

    def _dispatch(self) -> None:
        """Turn the core's events into wake-ups."""
        process = self._process  # events never replace it
        for event in self._protocol.events():
            if type(event) is Output:  # the common case, first
                if process is not None and process.exec_id == event.exec_id and process._feed(event.stream, event.data):
                    self._buffers_filled = True
            elif isinstance(event, _PROCESS_EVENTS):
                if process is None or process.exec_id != event.exec_id:
                    continue
                if isinstance(event, ExecStarted):
                    process._set_started()
                elif isinstance(event, ProcessEnded):
                    process._finish(event.returncode, event.error)
                elif isinstance(event, ExecRejected):
                    process._finish(None, event.error)
                elif isinstance(event, OutputIncomplete):
                    process.output_may_be_incomplete = True
                elif isinstance(event, StdinIncomplete):
                    process.stdin_may_be_incomplete = True
                elif isinstance(event, KillProcessFailed):
                    process._kill_failed(event.error)
            elif isinstance(event, SetupComplete | SetupFailed):
                if self._setup is not None:
                    self._setup.resolve(event.error if isinstance(event, SetupFailed) else None)
            elif isinstance(event, KillSandboxDone):
                if self._kill_outcome is not None:
                    self._kill_outcome.resolve(event.error)
            elif isinstance(event, CheckpointDone):
                if self._checkpoint_outcome is not None:
                    self._checkpoint_outcome.resolve(event.error)
            elif isinstance(event, SnapshotDone):
                if self._snapshot_outcome is not None:
                    self._snapshot_outcome.resolve(event.error)
            elif isinstance(event, ReconnectScheduled):
                self._reconnect_delay = event.delay
            elif isinstance(event, Reconnected):
                self.reconnects += 1
                logger.info("reconnected to sandbox %s%s", self.sandbox_id, " (restored)" if event.restored else "")
            elif isinstance(event, CloseConnection):
                self._close_code = event.code
                self._close_abort = event.abort
            elif isinstance(event, SessionEnded):
                self._end_error = event.error
                self._ended.set()
                if self._kill_outcome is not None:
                    self._kill_outcome.resolve(None)  # nothing left to kill from here
                if self._setup is not None:
                    self._setup.resolve(event.error or SandboxStateError(f"the sandbox is {self.state}"))

    async def _settle(self) -> None:
        """After the session ended: close the socket and stop reconnecting."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._dispatch()
        if self._close_code is None and self._protocol.is_ended:
            self._close_code = 1000
        await self._close_transport()
        # A reconnect in progress stops here; the transport's own tasks end with its socket.
        done = self._reconnect_done
        if self._reconnect_scope is not None:
            self._reconnect_scope.cancel()
        if done is not None:
            await done.wait()

    # ------------------------------------------------------------------
    # public API

    @property
    def sandbox_id(self) -> str | None:
        """The sandbox's id (``None`` until the server has sent it); attach again with it and the token."""
        return self._protocol.sandbox_id

    @property
    def sandbox_token(self) -> str | None:
        """The secret that lets anyone attach; never logged."""
        return self._protocol.sandbox_token

    @property
    def state(self) -> str:
        """Where the session stands: ``"connecting"``, ``"creating"``, ``"attaching"``, ``"restoring"``,
        ``"running"``, ``"checkpointing"``, ``"reconnecting"``, or, once it has ended,
        ``"checkpointed"``, ``"killed"``, ``"closed"`` or ``"failed"``."""
        return self._protocol.state.value

    @property
    def extensions(self) -> frozenset[str]:
        """Protocol extensions the server granted on the current connection (of those asked for)."""
        return self._protocol.extensions

    def __repr__(self) -> str:
        return f"<Sandbox {self.sandbox_id or '(new)'} {self.state}>"

    async def exec(
        self,
        language: str,
        code: str,
        *,
        timeout: float | None = DEFAULT_EXEC_TIMEOUT,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> SandboxProcess:
        """Run ``code`` (``"python"`` or ``"bash"``); returns once the process has started.

        ``env`` adds environment variables and ``cwd`` sets the working directory
        (relative to the usual one, ``/`` upstream), for this process only. The protocol has no field for
        either, so the client prepends a line of code that sets them (it works
        against the upstream service too); it shares the first line with
        ``code``, so line numbers in errors stay those of ``code``, except for
        python code whose first line opens a ``def``, ``class``, ``if``,
        decorator or other compound statement (or that this client's Python
        cannot parse): that code moves down one line.
        Values arrive verbatim (quoted, never interpreted); a variable name
        outside ``[A-Za-z_][A-Za-z0-9_]*`` or a NUL raises :class:`ValueError`.
        If ``cwd`` does not exist the process fails at once with a non-zero exit.

        ``language`` or ``code`` not a ``str`` raises :class:`TypeError` before
        anything is sent. A timeout or a cancellation leaves the sandbox
        usable: the exec is withdrawn if it was not sent yet, else killed once
        it starts.
        """
        check_exec_arguments(language, code)
        code = wrap_code(language, code, env=env, cwd=cwd)
        try:
            exec_id = self._protocol.exec(language, code)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        process = SandboxProcess(self, exec_id, self._buffer_limit, self._resume_reading)
        self._process = process
        try:
            with self._runtime.deadline(timeout, "starting the exec"):
                if self._transport.cancel_safe_send:
                    await self._flush()
                else:
                    self._schedule_flush()  # no need to wait for the writer: the reply is what counts
                await process._started.wait()
        except BaseException:
            if not process._started.is_set:
                self._protocol.abandon_exec(exec_id)
                self._dispatch()
                if self._protocol.has_data_to_send:
                    self._schedule_flush()
            raise
        return process

    async def run(
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

        Both streams are read at once, so a process that fills one of them
        never stalls. ``stdin`` is written to the process, then its stdin is
        closed (with or without ``stdin``: nothing else can write to it) where
        the server offers the ``close_stdin`` extension; without
        it (the upstream service) stdin stays open after the input, so a
        program that reads to end-of-file (``cat``, ``sys.stdin.read()``)
        waits until ``timeout``; read lines (``input()``, ``read``) instead.

        ``timeout`` bounds the whole run (600 s by default, like :meth:`SandboxProcess.wait`;
        ``None``: no limit): when it runs out the process is killed and :class:`SandboxTimeoutError` raised; the
        sandbox stays usable. ``exit_code`` is ``None`` where the server cannot
        tell (no ``exit_code`` extension). ``check=True`` raises
        :class:`SandboxProcessError` for a known non-zero exit code. ``env`` and
        ``cwd`` are those of :meth:`exec`.
        """
        return await _run.run(self, language, code, stdin=stdin, timeout=timeout, check=check, env=env, cwd=cwd)

    async def kill(self, *, timeout: float | None = DEFAULT_KILL_TIMEOUT) -> None:
        """Delete the sandbox on the server and close the connection.

        While reconnecting, the kill is sent once the sandbox is reattached;
        raises :class:`SandboxConnectionError` if it could not be delivered.
        """
        try:
            if not self._ended.is_set:
                if self._kill_outcome is None:
                    self._kill_outcome = Outcome(self._runtime)
                outcome = self._kill_outcome
                self._protocol.kill_sandbox()
                self._dispatch()
                try:
                    with deadline(timeout, "killing the sandbox"):
                        await self._flush()
                        await outcome.wait()
                except SandboxTimeoutError:
                    self._protocol.kill_sandbox_timed_out()
                    self._dispatch()
                    await outcome.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle()

    async def checkpoint(self, *, timeout: float | None = DEFAULT_CHECKPOINT_TIMEOUT) -> None:
        """Save the whole sandbox on the server; the connection ends. Attach again to continue."""
        try:
            self._protocol.checkpoint()
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        self._checkpoint_outcome = outcome = Outcome(self._runtime)
        try:
            with deadline(timeout, "checkpointing"):
                await self._flush()
                await outcome.wait()
        except SandboxTimeoutError:
            self._protocol.checkpoint_timed_out()
            self._dispatch()
            raise
        finally:
            if self._protocol.is_ended:
                with anyio.CancelScope(shield=True):
                    await self._settle()

    async def snapshot_filesystem(self, name: str, *, timeout: float | None = DEFAULT_SNAPSHOT_TIMEOUT) -> None:
        """Store the sandbox's files as snapshot ``name``, for ``create(filesystem_snapshot_name=...)``."""
        try:
            self._protocol.snapshot_filesystem(name)
        except LocalProtocolError as exc:
            raise SandboxStateError(str(exc)) from None
        self._snapshot_outcome = outcome = Outcome(self._runtime)
        try:
            with deadline(timeout, "snapshotting the filesystem"):
                await self._flush()
                await outcome.wait()
        except SandboxTimeoutError:
            self._protocol.snapshot_timed_out()
            raise

    # -- files, over exec and stdin (so they also work against the upstream service)

    async def write_file(self, path: str, data: bytes | str, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> None:
        """Create or replace the file at ``path`` (relative to the exec's working directory)."""
        await _files.write_file(self, path, data, timeout)

    async def read_file(self, path: str, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> bytes:
        """The whole content of the file at ``path``."""
        return await _files.read_file(self, path, timeout)

    async def read_text(
        self, path: str, *, encoding: str = "utf-8", timeout: float | None = DEFAULT_WAIT_TIMEOUT
    ) -> str:
        """The whole content of the file at ``path``, decoded with ``encoding``."""
        return (await _files.read_file(self, path, timeout)).decode(encoding)

    def iter_file(self, path: str, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> AsyncIterator[bytes]:
        """The file's content in chunks, for files too large to hold at once."""
        return _files.iter_file(self, path, timeout)

    async def list_dir(self, path: str = ".", *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> list[str]:
        """The names in directory ``path``, sorted."""
        return await _files.list_dir(self, path, timeout)

    async def close(self) -> None:
        """Detach from the sandbox and leave it running; attach again with its id and token."""
        self._protocol.close()
        with anyio.CancelScope(shield=True):
            await self._settle()

    async def wait_closed(self, *, timeout: float | None = DEFAULT_WAIT_TIMEOUT) -> SandboxException | None:
        """Wait until the session ends; returns why (``None`` for a deliberate end)."""
        with deadline(timeout, "waiting for the session to end"):
            await self._ended.wait()
        return self._end_error

    async def __aenter__(self) -> Self:
        if self._setup is None:
            raise SandboxStateError("open the sandbox first: async with await Sandbox.create(...)")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.kill()
            return
        try:
            await self.kill()
        except SandboxException as kill_error:
            # The body's exception is the one the caller must see; this one is only logged.
            logger.warning("killing sandbox %s on the way out failed: %s", self.sandbox_id, kill_error)
