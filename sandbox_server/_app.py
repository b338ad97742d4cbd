"""Routes and WebSocket connections: the thin layer between ``websockets`` and the sandboxes.

Each WebSocket gets a :class:`sandbox_proto.ServerProtocol`, which owns the
wire rules (dispatch, validation texts, DONE-iff-idle, extension fields) and
the decisions of attach, reconnect and stdin sequencing; this module feeds it
frames and facts, acts on what it returns, and writes what it queues to the
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import shutil
import ssl as ssl_module
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response as HttpResponse
from websockets.protocol import State

from sandbox_proto import (
    ALL_EXTENSIONS,
    AttachFacts,
    AttachStep,
    CheckpointRequested,
    Close,
    CloseStdinRequested,
    ExecRequested,
    KillProcessRequested,
    KillSandboxRequested,
    ReconnectRequested,
    RedactingFilter,
    RestoreResult,
    ResumeStream,
    ServerProtocol,
    SnapshotRequested,
    Status,
    StdinReceived,
    requested_extensions,
)

from ._errors import (
    CheckpointError,
    CheckpointInProgressError,
    CreationError,
    ExecutionStartError,
    PermissionDeniedError,
    RestoreError,
    SandboxNotFoundError,
    SnapshotError,
)
from ._execution import Execution
from ._isolation import IsolationMode, Limits, select_isolation
from ._manager import DEFAULT_OUTPUT_LIMIT, SandboxManager
from ._sandbox import Sandbox

__all__ = ["LocalServer"]

logger = logging.getLogger("sandbox_server")

ProtocolMode = Literal["upstream", "extended"]

MAX_MESSAGE_SIZE = 16 * 2**20
AFFINITY_COOKIE = "SANDBOX_AFFINITY"
#: Frames sent per batch by a stream before yielding, so one exec cannot starve the loop.
_BATCH = 256
#: How long a deletion waits for a stream to send its DONE.
_STREAM_END_TIMEOUT = 5.0
#: How long kill_process waits for the killed process to be gone before answering.
_KILL_WAIT = 2.0

# Per-connection memory (see docs/local-server.md, "Clients that stop reading").
#: Default of ``LocalServer(send_timeout=...)``: seconds bytes waiting for a peer may make no progress.
DEFAULT_SEND_TIMEOUT = 30.0
#: websockets' write buffer: ``send`` waits above the high-water mark until it drains below the low one.
WRITE_LIMIT = (64 * 2**10, 16 * 2**10)
#: Incoming frames websockets queues before it stops reading the socket (high, low): each may be
#: MAX_MESSAGE_SIZE, and frames are handled one at a time, so a deep queue only costs memory.
MAX_QUEUE = (2, 0)
#: How long a close handshake may take before the TCP connection is aborted.
CLOSE_TIMEOUT = 2.0
#: Output frames are written to the socket in batches of about this many bytes, then drained.
_SEND_BATCH_BYTES = WRITE_LIMIT[0]
#: Per-message deflate as websockets offers it by default (12-bit windows, memLevel 5), but
#: without context takeover either way: zlib's state then lives for one message instead of
#: for the connection (~44 KiB per idle sandbox), for ~2 us more per frame sent.
_DEFLATE = ServerPerMessageDeflateFactory(
    server_no_context_takeover=True,
    client_no_context_takeover=True,
    server_max_window_bits=12,
    client_max_window_bits=12,
    compress_settings={"memLevel": 5},
)
#: stop(): how long connections get to take their 1012, then to go once aborted.
_STOP_CLOSE_GRACE = 2.0
_STOP_ABORT_GRACE = 1.0


#: What a connection's ``request`` becomes once its handshake is read (see ``_handler``).
_HANDSHAKE_DONE = HttpRequest("/", Headers())

_ws_logger = logging.getLogger("sandbox_server.websockets")
if not any(isinstance(f, RedactingFilter) for f in _ws_logger.filters):
    _ws_logger.addFilter(RedactingFilter())


# --------------------------------------------------------------------------
# routes


@dataclass(frozen=True, slots=True)
class _Route:
    kind: Literal["create", "attach"]
    sandbox_id: str = ""
    token: str = field(default="", repr=False)
    #: The handshake's ``extensions`` parameter (``None``: it asks for none, upstream frames only).
    extensions: frozenset[str] | None = None


def _parse_route(path: str) -> _Route | None:
    """The WebSocket route of a request target, or ``None`` (HTTP 403, as upstream: 2.2, 2.3)."""
    parts = urlsplit(path)
    extensions = requested_extensions(parts.query)
    if parts.path == "/create":
        return _Route("create", extensions=extensions)
    prefix = "/attach/"
    if parts.path.startswith(prefix):
        raw_id = parts.path[len(prefix) :]
        if not raw_id or "/" in raw_id:
            return None
        tokens = parse_qs(parts.query, keep_blank_values=True).get("sandbox_token")
        if tokens is None:
            return None
        return _Route("attach", unquote(raw_id), tokens[-1], extensions)
    return None


def _json_response(connection: ServerConnection, status: int, body: dict[str, Any]) -> HttpResponse:
    response = connection.respond(status, json.dumps(body, separators=(",", ":")))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" / "0.0.0.0"-like wildcards: assume reachable


def _is_upgrade(headers: Headers) -> bool:
    return any(value.strip().lower() == "websocket" for value in headers.get_all("Upgrade"))


# --------------------------------------------------------------------------
# one WebSocket


class _ServerConnection(ServerConnection):
    """websockets' connection, plus sending many messages in one socket write."""

    async def send_texts(self, texts: list[str]) -> None:
        """Send each of ``texts`` as one Text message; raises ``ConnectionClosed`` as ``send`` does.

        ``send`` writes each message to the transport on its own, and asyncio's
        transport makes a ``send()`` system call per write while its buffer is
        empty: per 1 KiB output frame, the largest cost of streaming output.
        Never a fragmented message, so ``send``'s wait for one is not needed.
        """
        async with self.send_context():
            for text in texts:
                self.protocol.send_text(text.encode())
            self.transport.write(b"".join(self.protocol.data_to_send()))


class _Connection:
    """One client WebSocket: setup, then one frame at a time (S8), plus an output stream task."""

    def __init__(self, server: LocalServer, ws: _ServerConnection, route: _Route) -> None:
        self.server = server
        self.manager = server.manager
        self.ws = ws
        self.proto = ServerProtocol(
            create=route.kind == "create",
            # Granted per connection: what the client asked for and the server supports (15).
            extensions=server.extensions,
            requested=route.extensions,
            checkpoint_enabled=self.manager.checkpoint_enabled,
            snapshots_enabled=self.manager.snapshots_enabled,
        )
        self.sandbox: Sandbox | None = None
        self._send_lock = asyncio.Lock()
        self._forwarder: asyncio.Task[None] | None = None
        #: Highest seq this connection has queued for sending.
        self._cursor = 0
        #: Sends completed: each one means the write buffer drained below its low-water mark.
        self._sends = 0
        # What check_writes saw last time (see there).
        now = asyncio.get_running_loop().time()
        self._last_progress, self._last_size, self._last_sends = now, 0, 0

    # -- sending -------------------------------------------------------------

    async def flush(self) -> bool:
        """Send what the protocol queued, in order, whichever task queued it; ``False`` once closed."""
        async with self._send_lock:
            batch: list[str] = []
            size = 0
            try:
                for item in self.proto.data_to_send():
                    if isinstance(item, Close):
                        if batch:
                            await self._send_batch(batch)
                            batch, size = [], 0
                        await self.ws.close(int(item))
                        self._sends += 1
                        continue
                    batch.append(item)
                    size += len(item)
                    if size >= _SEND_BATCH_BYTES:
                        await self._send_batch(batch)
                        batch, size = [], 0
                if batch:
                    await self._send_batch(batch)
            except ConnectionClosed:
                return False  # the read loop notices and cleans up
        # A send cut short by an abort returns normally: the state tells.
        return self.ws.state is State.OPEN

    async def _send_batch(self, batch: list[str]) -> None:
        if len(batch) == 1:
            await self.ws.send(batch[0])
        else:
            await self.ws.send_texts(batch)
        self._sends += 1

    def check_writes(self, now: float, timeout: float) -> None:
        """Abort the connection when bytes waiting for the peer have made no progress for ``timeout``.

        Called periodically by the server for every connection. ``send`` (and
        websockets' own ping and close) wait without limit while the peer reads
        nothing, holding the write buffer, the frames queued behind it and the
        incoming queue. Aborting frees them; the output stays in the sandbox's
        log for a reconnect.
        """
        transport = self.ws.transport
        if transport.is_closing():
            return
        size = transport.get_write_buffer_size()
        if size == 0 or size < self._last_size or self._sends != self._last_sends:
            self._last_progress = now
        self._last_size, self._last_sends = size, self._sends
        if now - self._last_progress >= timeout:
            name = self.sandbox.id if self.sandbox is not None else "(none yet)"
            logger.warning(
                "sandbox %s: the client read nothing for %.1f s (%d bytes waiting): dropping the connection",
                name,
                timeout,
                size,
            )
            transport.abort()

    # -- lifecycle -----------------------------------------------------------

    async def run(self, route: _Route) -> None:
        try:
            ready = await self._create() if route.kind == "create" else await self._attach(route)
            if ready:
                async for message in self.ws:
                    await self._handle(message)
        except ConnectionClosed:
            pass
        finally:
            await self._cleanup()

    async def _notify(self, status: Status) -> None:
        self.proto.send_status(status)
        await self.flush()

    async def _create(self) -> bool:
        message = await self.ws.recv()
        try:
            options = self.proto.receive_init(message)
        except Exception:
            # A creation error rather than a silent close (1000) from the handler's exit.
            logger.exception("init message failed")
            self.proto.fail_creation("Internal server error.")
            options = None
        if options is None:
            await self.flush()
            return False
        await self.flush()  # SANDBOX_CREATING before the (possibly slow) setup
        try:
            sandbox, token = await self.manager.create(options, self._notify)
        except CreationError as exc:
            self.proto.fail_creation(str(exc))
            await self.flush()
            return False
        self.sandbox = sandbox
        sandbox.observer = self
        self.proto.send_sandbox_id(sandbox.id, token)
        self.proto.send_running()
        await self.flush()
        return True

    async def _attach(self, route: _Route) -> bool:
        # The protocol decides (order of checks, frames); this gathers the facts and restores.
        sandbox_id = route.sandbox_id
        sandbox = self.manager.get(sandbox_id) if route.token else None
        facts = self._attach_facts(AttachFacts(sandbox_id, bool(route.token)), sandbox, route.token)
        step = self.proto.answer_attach(facts)
        if step is AttachStep.RESTORE:
            await self.flush()  # SANDBOX_RESTORING before the lookup and any lock frames
            result, error = RestoreResult.RESTORED, ""
            try:
                sandbox = await self.manager.restore(sandbox_id, route.token, self._notify)
            except SandboxNotFoundError:
                result = RestoreResult.NOT_FOUND
            except PermissionDeniedError:
                result = RestoreResult.PERMISSION_DENIED
            except RestoreError as exc:
                result, error = RestoreResult.FAILED, str(exc)
            facts = replace(facts, restore=result, restore_error=error)
            if result is RestoreResult.RESTORED:
                facts = self._attach_facts(facts, sandbox, route.token)
            step = self.proto.answer_attach(facts)
        if step is AttachStep.ATTACHED:
            assert sandbox is not None
            self.sandbox = sandbox
            sandbox.observer = self
            sandbox.touch()
            logger.info("sandbox %s attached", sandbox.id)
        await self.flush()
        return step is AttachStep.ATTACHED

    @staticmethod
    def _attach_facts(facts: AttachFacts, sandbox: Sandbox | None, token: str) -> AttachFacts:
        if sandbox is None:
            return facts
        return replace(
            facts,
            found=True,
            token_ok=sandbox.check_token(token),
            observed=sandbox.observer is not None,
            phase=sandbox.phase(),
        )

    async def _cleanup(self) -> None:
        # Stdin this connection queued stays queued: it belongs to the exec (stdin_seq).
        await self._stop_forwarder()
        sandbox = self.sandbox
        if sandbox is not None and sandbox.observer is self:
            # Detached: the sandbox and its processes live on (1.1, 7.12).
            sandbox.observer = None
            if not sandbox.deleted:
                logger.info("sandbox %s detached", sandbox.id)

    # -- frames --------------------------------------------------------------

    @property
    def _streaming(self) -> bool:
        return self._forwarder is not None and not self._forwarder.done()

    async def _handle(self, message: str | bytes) -> None:
        sandbox = self.sandbox
        assert sandbox is not None
        sandbox.touch()
        if not self._streaming:
            # Another connection, or no one, may have seen the last exec end.
            self.proto.process = sandbox.phase()
        try:
            request = self.proto.receive(message)
            await self._dispatch(sandbox, request)
        except Exception:
            # Upstream's unanticipated-error path (7.3.6), without internals in the text.
            logger.exception("sandbox %s: request failed", sandbox.id)
            self.proto.send_error(Status.SANDBOX_ERROR, "Internal server error.", close=4000)
        await self.flush()

    async def _dispatch(self, sandbox: Sandbox, request: object) -> None:
        if isinstance(request, ExecRequested):
            await self._exec(sandbox, request)
        elif isinstance(request, StdinReceived | CloseStdinRequested):
            self._queue_stdin(sandbox, request)
        elif isinstance(request, KillProcessRequested):
            await self._kill_process(sandbox)
        elif isinstance(request, KillSandboxRequested):
            await self._kill_sandbox(sandbox)
        elif isinstance(request, ReconnectRequested):
            await self._reconnect(sandbox, request)
        elif isinstance(request, CheckpointRequested):
            await self._checkpoint(sandbox)
        elif isinstance(request, SnapshotRequested):
            await self._snapshot(sandbox, request.name)

    async def _exec(self, sandbox: Sandbox, request: ExecRequested) -> None:
        try:
            execution = await sandbox.start_exec(request.language, request.code, ref=request.ref)
        except ExecutionStartError as exc:
            self.proto.reject_exec(Status.SANDBOX_EXECUTION_ERROR, str(exc))
            return
        await self._stop_forwarder()
        self.proto.exec_started(request.ref)
        await self.flush()
        self._stream(execution, execution.first_seq - 1, report_gaps=False)

    def _queue_stdin(self, sandbox: Sandbox, request: StdinReceived | CloseStdinRequested) -> None:
        # The exec's own writer task writes it: in order across connections, and
        # a process that does not read its stdin cannot block the frame loop.
        execution = sandbox.execution
        if execution is None or not execution.running:
            return
        if not self.proto.is_new_stdin(request, execution.stdin_seq):
            return
        if not execution.queue_stdin(request.data if isinstance(request, StdinReceived) else None, request.seq):
            rate = self.manager.isolation.limits.stdin_rate
            self.proto.send_error(
                Status.SANDBOX_ERROR, f"Stdin rate limit exceeded ({rate} bytes/s): the data was dropped."
            )
            return
        self.proto.stdin_accepted(request)

    async def _kill_process(self, sandbox: Sandbox) -> None:
        execution = sandbox.execution
        if execution is not None and execution.running and not sandbox.deleted:
            try:
                execution.kill()
            except OSError as exc:
                logger.warning("sandbox %s: kill failed: %s", sandbox.id, exc)
                self.proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILL_ERROR)
                return
            # Upstream forgets the process at once, so an exec right behind the kill is accepted;
            # here it must be gone first (frames are handled one at a time). SIGKILL takes ms.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(execution.finished.wait(), _KILL_WAIT)
        self.proto.send_status(Status.SANDBOX_EXECUTION_FORCE_KILLED)

    async def _kill_sandbox(self, sandbox: Sandbox) -> None:
        if sandbox.deleted:
            self.proto.close(1000)  # no status at all when it is already gone (7.6)
            return
        self.proto.send_status(Status.SANDBOX_KILLING)
        await self.flush()
        try:
            # DELETING, [DONE], [lock frames], DELETED come through the observer; metadata goes too (7.6).
            await self.manager.delete(sandbox, forget=True)
        except Exception:
            logger.exception("sandbox %s: kill failed", sandbox.id)
            self.proto.send_status(Status.SANDBOX_KILL_ERROR)
        else:
            self.proto.send_status(Status.SANDBOX_KILLED)
        self.proto.close(1000)

    async def _checkpoint(self, sandbox: Sandbox) -> None:
        self.proto.send_status(Status.SANDBOX_CHECKPOINTING)
        await self.flush()
        try:
            await self.manager.checkpoint(sandbox)
        except CheckpointInProgressError as exc:
            self.proto.send_error(Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR, str(exc))
        except CheckpointError as exc:
            # S11: a sandbox that could not be checkpointed is kept.
            self.proto.send_error(
                Status.SANDBOX_CHECKPOINT_ERROR, f"Failed to checkpoint sandbox {sandbox.id}: {exc}", close=4000
            )
        else:
            self.proto.send_status(Status.SANDBOX_CHECKPOINTED)
            self.proto.close(1000)

    async def _snapshot(self, sandbox: Sandbox, name: object) -> None:
        self.proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATING)
        await self.flush()
        try:
            await self.manager.snapshot(sandbox, name)
        except SnapshotError as exc:
            message = f"Failed to snapshot filesystem for sandbox {sandbox.id}: {exc}"
            self.proto.send_error(Status.SANDBOX_FILESYSTEM_SNAPSHOT_ERROR, message)
        else:
            self.proto.send_status(Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATED)

    async def _reconnect(self, sandbox: Sandbox, request: ReconnectRequested) -> None:
        """Act on the protocol's reply to ``reconnect`` (7.12, S1)."""
        execution = sandbox.execution
        cursor = self._cursor if self._streaming else None
        answer = self.proto.answer_reconnect(request, sandbox.execution_view(), streaming_cursor=cursor)
        if isinstance(answer, ResumeStream):
            assert execution is not None
            # Its RUNNING is queued already; the old stream must not send after it.
            await self._stop_forwarder()
            self._stream(execution, answer.cursor, report_gaps=answer.report_gaps)
        elif answer.done_delivered and execution is not None:
            execution.done_delivered = True

    # -- output stream ----------------------------------------------------------

    def _stream(self, execution: Execution, cursor: int, *, report_gaps: bool) -> None:
        """Send the exec's frames after ``cursor``, then its DONE (RUNNING is sent already)."""
        self._cursor = cursor
        self._forwarder = asyncio.create_task(self._forward(execution, report_gaps))

    async def _stop_forwarder(self) -> None:
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forwarder
            self._forwarder = None

    async def _forward(self, execution: Execution, report_gaps: bool) -> None:
        """Send the exec's frames after the cursor as they come, then its DONE."""
        sandbox = execution.sandbox
        log = sandbox.log
        while True:
            frames = log.frames_after(self._cursor, execution.last_seq, _BATCH)
            if frames:
                if report_gaps and frames[0].seq > self._cursor + 1:
                    self.proto.send_output_gap(self._cursor + 1, frames[0].seq - 1)
                for chunk in frames:
                    self.proto.send_output(chunk.stream, chunk.data, chunk.seq)
                self._cursor = frames[-1].seq
                if not await self.flush():
                    # Dropped or gone: what it did not take stays undelivered, for a reconnect.
                    return
                sandbox.mark_delivered(self._cursor)
                continue
            if execution.finished.is_set():
                if self._cursor < execution.last_seq:
                    # The rest was evicted before this connection asked for it.
                    if report_gaps:
                        self.proto.send_output_gap(self._cursor + 1, execution.last_seq)
                    self._cursor = execution.last_seq
                break
            await log.changed.wait()
        self.proto.exec_finished(execution.exit_code, killed=execution.killed)
        if await self.flush():
            execution.done_delivered = True

    # -- what the sandbox tells its attached connection -------------------------

    async def sandbox_status(self, status: Status) -> None:
        self.proto.send_status(status)
        await self.flush()

    async def sandbox_error(self, status: Status, message: str) -> None:
        self.proto.send_error(status, message)
        await self.flush()

    async def wait_stream_end(self) -> None:
        forwarder = self._forwarder
        if forwarder is not None and not forwarder.done():
            _, pending = await asyncio.wait([forwarder], timeout=_STREAM_END_TIMEOUT)
            if pending:
                await self._stop_forwarder()


# --------------------------------------------------------------------------
# the server


class LocalServer:
    """The local reference server, embeddable: ``async with LocalServer(port=0) as s: s.url``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        state_dir: str | Path | None = None,
        protocol: ProtocolMode = "extended",
        *,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idle_sweep_interval: float = 0.25,
        checkpoints: bool = True,
        snapshots: bool = True,
        lease_duration: float = 60.0,
        lease_renewal_interval: float = 20.0,
        lock_wait_timeout: float = 30.0,
        handoff_poll_interval: float = 1.0,
        isolation: IsolationMode = "auto",
        limits: Limits | None = None,
        ssl: ssl_module.SSLContext | None = None,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
        detached_timeout: float | None = None,
    ) -> None:
        """``checkpoints``/``snapshots`` switch storage off for the "not enabled" paths (11.1).

        ``isolation`` is ``"bwrap"`` (every exec under bubblewrap; startup fails
        without it), ``"none"`` (plain processes) or ``"auto"`` (bwrap when it
        works here, else none with a warning). ``limits`` are the per-sandbox
        resource limits (:class:`Limits`, defaults when omitted). With ``ssl``
        the server speaks ``wss://`` and :attr:`url` is ``https://...``.

        Several servers (processes or objects) given the same ``state_dir`` act
        as instances of one service: they share checkpoints, snapshots and the
        handoff locks. ``lease_duration`` is how long a crashed instance keeps a
        sandbox's lock; ``lease_renewal_interval`` how often a live one renews
        it; ``lock_wait_timeout`` how long an attach waits for another instance
        to hand a sandbox over; ``handoff_poll_interval`` how often an instance
        looks for such a waiter.

        ``detached_timeout`` bounds detached work: once a sandbox has had no
        client attached for that many seconds, its running exec and background
        processes are killed (then the idle timeout applies as usual). ``None``
        keeps the upstream rule: a running exec blocks idle expiry, forever.

        ``send_timeout`` is how long bytes waiting for a client may make no
        progress before the connection is dropped (its sandbox then stays
        detached, its output kept for a reconnect).
        """
        if not send_timeout > 0:
            raise ValueError("send_timeout must be positive")
        self.send_timeout = float(send_timeout)
        #: Handlers of open WebSockets, so that stop() can cut off those that do not close.
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._write_watch: asyncio.Task[None] | None = None
        if not 0 < lease_renewal_interval < lease_duration:
            raise ValueError("lease_renewal_interval must be positive and shorter than lease_duration")
        if protocol not in ("upstream", "extended"):
            raise ValueError(f"protocol must be 'upstream' or 'extended', not {protocol!r}")
        if isolation not in ("auto", "bwrap", "none"):
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', not {isolation!r}")
        if detached_timeout is not None and not detached_timeout > 0:
            raise ValueError("detached_timeout must be positive, or None for no limit")
        self.detached_timeout = detached_timeout
        self.isolation: IsolationMode = isolation
        self.limits = limits if limits is not None else Limits()
        self.ssl = ssl
        self.host = host
        self.port = port
        self.protocol: ProtocolMode = protocol
        self.extensions: tuple[str, ...] = ALL_EXTENSIONS if protocol == "extended" else ()
        #: Sent in the affinity cookie; distinguishes instances sharing a state directory.
        self.instance_id = secrets.token_hex(8)
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._temporary_state: Path | None = None
        self._output_limit = output_limit
        self._idle_sweep_interval = idle_sweep_interval
        self.checkpoints = checkpoints
        self.snapshots = snapshots
        self._lease_options: dict[str, float] = {
            "lease_duration": lease_duration,
            "lease_renewal_interval": lease_renewal_interval,
            "lock_wait_timeout": lock_wait_timeout,
            "handoff_poll_interval": handoff_poll_interval,
            "lock_poll_interval": min(0.25, handoff_poll_interval),
        }
        self._manager: SandboxManager | None = None
        self._server: Server | None = None

    @property
    def manager(self) -> SandboxManager:
        if self._manager is None:
            raise RuntimeError("the server is not started")
        return self._manager

    @property
    def state_dir(self) -> Path:
        return self.manager.state_dir

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the server is already started")
        if self._state_dir is None:
            self._temporary_state = Path(tempfile.mkdtemp(prefix="sandbox-server-"))
        state_dir = self._state_dir or self._temporary_state
        assert state_dir is not None
        try:
            isolation = await select_isolation(self.isolation, self.limits)
        except BaseException:
            self._remove_temporary_state()
            raise
        if self.ssl is None and not _is_loopback(self.host):
            logger.warning("listening on %s without TLS: tokens and code cross the network in clear", self.host)
        self._manager = SandboxManager(
            state_dir,
            instance_id=self.instance_id,
            checkpoint_enabled=self.checkpoints,
            snapshots_enabled=self.snapshots,
            output_limit=self._output_limit,
            idle_sweep_interval=self._idle_sweep_interval,
            isolation=isolation,
            lease_duration=self._lease_options["lease_duration"],
            lease_renewal_interval=self._lease_options["lease_renewal_interval"],
            lock_wait_timeout=self._lease_options["lock_wait_timeout"],
            handoff_poll_interval=self._lease_options["handoff_poll_interval"],
            lock_poll_interval=self._lease_options["lock_poll_interval"],
            detached_timeout=self.detached_timeout,
        )
        await self._manager.start()
        if self._temporary_state is not None:
            self._manager.janitor.track("dir", self._temporary_state)  # gone even if we are killed
        try:
            self._server = await serve(
                self._handler,
                self.host,
                self.port,
                process_request=self._process_request,
                process_response=self._process_response,
                max_size=MAX_MESSAGE_SIZE,
                max_queue=MAX_QUEUE,
                write_limit=WRITE_LIMIT,
                close_timeout=CLOSE_TIMEOUT,
                ssl=self.ssl,
                ping_interval=20,
                ping_timeout=20,
                logger=_ws_logger,
                compression=None,
                extensions=[_DEFLATE],
                create_connection=_ServerConnection,
            )
        except BaseException:
            await self._manager.shutdown()
            self._remove_temporary_state()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._write_watch = asyncio.create_task(self._watch_writes(), name="sandbox-write-watch")
        logger.info("listening on %s (protocol %s)", self.url, self.protocol)

    async def stop(self) -> None:
        """Close every WebSocket with 1012, kill every sandbox process, remove a temporary state dir.

        Bounded whatever the clients do (about 3 s for the connections): a
        close frame stuck behind a client that reads nothing would otherwise
        wait for ever, so connections still open after a grace are aborted,
        and handlers still running after that are cancelled.
        """
        server, self._server = self._server, None
        if self._write_watch is not None:
            self._write_watch.cancel()
            self._write_watch = None
        if server is not None:
            server.close(code=1012)
            await self._close_connections(server)
        if self._manager is not None:
            await self._manager.shutdown()
        self._remove_temporary_state()

    async def _close_connections(self, server: Server) -> None:
        closed = asyncio.create_task(server.wait_closed())
        try:
            await asyncio.wait([closed], timeout=_STOP_CLOSE_GRACE)
            if not closed.done():
                stuck = [task for task, conn in self._connections.items() if not conn.ws.transport.is_closing()]
                logger.warning("%d connection(s) did not close in %s s: aborting them", len(stuck), _STOP_CLOSE_GRACE)
                for conn in self._connections.values():
                    conn.ws.transport.abort()
            handlers = list(self._connections)
            if handlers:
                _, pending = await asyncio.wait(handlers, timeout=_STOP_ABORT_GRACE)
                for task in pending:  # busy elsewhere (a lock wait, a checkpoint): stop it there
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=_STOP_ABORT_GRACE)
        finally:
            # websockets' own close task ends by itself once its handlers have; nothing to wait for.
            closed.cancel()

    async def _watch_writes(self) -> None:
        """Every connection's :meth:`_Connection.check_writes`, from one task for all of them.

        One task rather than one per connection: 10,000 idle sandboxes would
        otherwise be 10,000 tasks waking every few seconds.
        """
        timeout = self.send_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(max(timeout / 8, 0.05), 5.0))
            now = loop.time()
            for connection in list(self._connections.values()):
                connection.check_writes(now, timeout)

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        await asyncio.Event().wait()

    def _remove_temporary_state(self) -> None:
        if self._temporary_state is not None:
            shutil.rmtree(self._temporary_state, ignore_errors=True)
            self._temporary_state = None

    # -- websockets hooks ---------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: HttpRequest) -> HttpResponse | None:
        path = urlsplit(request.path).path
        if not _is_upgrade(request.headers):
            # Plain HTTP, answered the way FastAPI answers it (2.5).
            if path in ("/", "/status"):
                if request.method != "GET":
                    return _json_response(connection, 405, {"detail": "Method Not Allowed"})
                body = {"message": "Server is running"} if path == "/" else {"status": "ok"}
                return _json_response(connection, 200, body)
            return _json_response(connection, 404, {"detail": "Not Found"})
        if _parse_route(request.path) is None:
            return connection.respond(403, "Forbidden\n")
        return None

    def _process_response(
        self, connection: ServerConnection, request: HttpRequest, response: HttpResponse
    ) -> HttpResponse | None:
        if response.status_code == 101:
            # Session affinity, so that cookie handling can be tested (2.4).
            response.headers["Set-Cookie"] = f"{AFFINITY_COOKIE}={self.instance_id}; Path=/; HttpOnly"
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        assert isinstance(ws, _ServerConnection)
        route = _parse_route(ws.request.path if ws.request is not None else "")
        if route is None:  # process_request refused it already
            return
        # The handshake is over and nothing reads it again: ~3 KiB of headers per idle sandbox.
        # websockets takes a missing request for a handshake still to come, hence a stand-in.
        ws.request, ws.response = _HANDSHAKE_DONE, None
        connection = _Connection(self, ws, route)
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = connection
        try:
            await connection.run(route)
        except Exception:
            logger.exception("connection failed")
        finally:
            del self._connections[task]
