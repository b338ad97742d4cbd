"""The client role: every decision a sandbox client makes, with no I/O.

Rules of this file (after h11's ``_state.py``):

* All client-side protocol state lives here; adapters keep none.
* Inputs are method calls: what arrived (``receive``, ``connection_opened``,
  ``connection_closed``, ``connection_failed``), what the user asked
  (``exec``, ``write_stdin``, ...), and what time it is when time matters.
* Outputs are pulled: :meth:`ClientProtocol.data_to_send` gives the text
  frames to write, :meth:`ClientProtocol.events` what the adapter must wake.
* Local misuse raises :class:`LocalProtocolError`; bad server input never
  raises, it is logged and ignored, or it ends the session with an event.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from ._errors import (
    LocalProtocolError,
    RemoteProtocolError,
    SandboxCheckpointError,
    SandboxConnectionError,
    SandboxCreationError,
    SandboxDeletedError,
    SandboxException,
    SandboxExecutionError,
    SandboxFilesystemSnapshotError,
    SandboxStateError,
)
from ._frames import (
    CheckpointRequest,
    ClientFrame,
    CloseStdinRequest,
    ErrorFrame,
    ExecRequest,
    InitRequest,
    KillProcessRequest,
    KillSandboxRequest,
    OutputFrame,
    OutputGapFrame,
    ReconnectRequest,
    SandboxIdFrame,
    SnapshotRequest,
    StatusFrame,
    StdinRequest,
    Stream,
    UnknownFrame,
    decode_server_object,
    encode_client_frame,
    load_json,
)
from ._status import ERROR_FRAME_STATUSES, FATAL_STATUSES, Status
from ._url import attach_url, cookie_header, create_url, merge_set_cookies, redact, websocket_base

logger = logging.getLogger("sandbox_proto.client")

EXT_EXIT_CODE = "exit_code"
EXT_SEQ = "seq"
EXT_CLOSE_STDIN = "close_stdin"

# Jitter needs no per-session generator; a Random costs 2.5 KB, a lot for idle sandboxes.
_SHARED_RNG = random.Random()

# Handshake refusals that a retry cannot fix (protocol.md 2.4).
NON_RETRYABLE_HTTP_STATUSES = frozenset({400, 401, 403, 404})


_EXTENSION_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def _extension_set(names: tuple[str, ...] | None) -> frozenset[str]:
    """One shared frozenset per distinct list: every sandbox of a server gets the same one."""
    key = names or ()
    found = _EXTENSION_SETS.get(key)
    if found is None:
        found = frozenset(key)
        if len(_EXTENSION_SETS) < 64:  # bounded: servers advertise a handful of lists
            _EXTENSION_SETS[key] = found
    return found


class SandboxState(enum.Enum):
    CONNECTING = "connecting"
    CREATING = "creating"
    ATTACHING = "attaching"
    RESTORING = "restoring"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RECONNECTING = "reconnecting"
    CHECKPOINTED = "checkpointed"
    KILLED = "killed"
    CLOSED = "closed"
    FAILED = "failed"


_ENDED = frozenset({SandboxState.CHECKPOINTED, SandboxState.KILLED, SandboxState.CLOSED, SandboxState.FAILED})
_SETUP = frozenset({SandboxState.CONNECTING, SandboxState.CREATING, SandboxState.ATTACHING, SandboxState.RESTORING})
#: Statuses about the active process: those of its lifecycle, and a stdin failure.
_PROCESS_STATUSES = frozenset(
    status
    for status in Status
    if status is Status.SANDBOX_STDIN_ERROR
    or (status.name.startswith("SANDBOX_EXECUTION_") and status is not Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR)
)


class ProcessState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    KILLING = "killing"
    DONE = "done"


# --------------------------------------------------------------------------
# events for the adapter


@dataclass(frozen=True, slots=True)
class SetupComplete:
    """Create or attach succeeded: the sandbox is ``RUNNING`` on this connection."""

    sandbox_id: str
    restored: bool


@dataclass(frozen=True, slots=True)
class SetupFailed:
    error: SandboxException


@dataclass(frozen=True, slots=True)
class ExecStarted:
    exec_id: int


@dataclass(frozen=True, slots=True)
class ExecRejected:
    exec_id: int
    error: SandboxException


@dataclass(slots=True)  # not frozen: one per output frame, and frozen ones cost 3x to make. Read-only.
class Output:
    exec_id: int
    stream: Stream
    data: str


@dataclass(frozen=True, slots=True)
class OutputIncomplete:
    """Output of this exec may have been lost across a reconnect (no ``seq``) or a gap."""

    exec_id: int


@dataclass(frozen=True, slots=True)
class ProcessEnded:
    exec_id: int
    #: From the ``exit_code`` extension, else ``None``.
    returncode: int | None
    #: Set when the process did not end on its own terms (connection lost, sandbox gone).
    error: SandboxException | None


@dataclass(frozen=True, slots=True)
class KillProcessFailed:
    exec_id: int
    error: SandboxException


@dataclass(frozen=True, slots=True)
class KillSandboxDone:
    error: SandboxException | None


@dataclass(frozen=True, slots=True)
class CheckpointDone:
    error: SandboxException | None


@dataclass(frozen=True, slots=True)
class SnapshotDone:
    error: SandboxException | None


@dataclass(frozen=True, slots=True)
class ReconnectScheduled:
    """Open a new connection (see :meth:`ClientProtocol.handshake`) after ``delay`` seconds."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Reconnected:
    restored: bool


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """The adapter must close the socket with this code."""

    code: int = 1000
    #: Drop the connection without a closing handshake: the peer stopped answering.
    abort: bool = False


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """Nothing more will happen on this sandbox object; ``error`` is why, if not deliberate."""

    error: SandboxException | None


Event = (
    SetupComplete
    | SetupFailed
    | ExecStarted
    | ExecRejected
    | Output
    | OutputIncomplete
    | ProcessEnded
    | KillProcessFailed
    | KillSandboxDone
    | CheckpointDone
    | SnapshotDone
    | ReconnectScheduled
    | Reconnected
    | CloseConnection
    | SessionEnded
)


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Capped exponential backoff with full jitter and a total deadline (7.12)."""

    initial_delay: float = 0.1
    max_delay: float = 8.0
    multiplier: float = 2.0
    #: Give up when this many seconds have passed since the connection was lost.
    deadline: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay before ``attempt`` (1-based); the first retry is immediate-ish."""
        if attempt <= 1:
            return 0.0
        ceiling = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 2))
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class Handshake:
    """Where and how the adapter must open the next WebSocket."""

    # Carries the token in its query (2.3): never in a repr; log ``safe_url``.
    url: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    #: The URL with the token hidden, for logs and error messages.
    safe_url: str = ""


@dataclass(slots=True)
class _Process:
    exec_id: int
    state: ProcessState = ProcessState.STARTING
    kill_requested: bool = False
    kill_sent: bool = False
    force_killed_seen: bool = False
    stdin_buffer: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _PendingError:
    """An error status waiting for its ``error`` frame (6.1)."""

    status: Status
    kind: str


class ClientProtocol:
    """One sandbox session seen from the client: create or attach, then reconnects."""

    # Slots: one per sandbox, so its ~30 fields cost ~1.2 KiB less than a __dict__.
    __slots__ = (
        "_base",
        "_checkpoint_pending",
        "_cookies",
        "_events",
        "_ever_running",
        "_init",
        "_kill_sandbox_pending",
        "_label",
        "_last_seq",
        "_leaving_reason",
        "_log",
        "_lost_at",
        "_next_exec_id",
        "_outgoing",
        "_pending_errors",
        "_process",
        "_process_at_drop",
        "_reconnect_attempt",
        "_reconnectable",
        "_restored",
        "_rng",
        "_session_ended",
        "_snapshot_pending",
        "_stray_done",
        "_stray_force_killed",
        "_user_headers",
        "_was_reconnecting",
        "auto_reconnect",
        "extensions",
        "reconnect_policy",
        "sandbox_id",
        "sandbox_token",
        "state",
    )

    def __init__(
        self,
        url: str,
        *,
        init: InitRequest | None = None,
        sandbox_id: str | None = None,
        sandbox_token: str | None = None,
        auto_reconnect: bool = False,
        reconnect_policy: ReconnectPolicy | None = None,
        headers: dict[str, str] | None = None,
        label: str = "",
        log: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if (init is None) == (sandbox_id is None):
            raise LocalProtocolError("give either init (create) or sandbox_id (attach)")
        if sandbox_id is not None and not sandbox_token:
            raise LocalProtocolError("attach needs a non-empty sandbox_token")
        self._base = websocket_base(url)
        self._init = init
        self.sandbox_id: str | None = sandbox_id
        self.sandbox_token: str | None = sandbox_token
        self.auto_reconnect = auto_reconnect
        self.reconnect_policy = reconnect_policy or ReconnectPolicy()
        self._user_headers = dict(headers or {})
        self._log = log or logger
        self._label = label
        self._rng = rng or _SHARED_RNG

        self.state = SandboxState.CONNECTING
        #: Extensions the server advertised on the current connection.
        self.extensions: frozenset[str] = frozenset()
        self._cookies: dict[str, str] = {}
        self._outgoing: list[str] = []
        self._events: list[Event] = []
        self._pending_errors: list[_PendingError] = []
        self._process: _Process | None = None
        self._next_exec_id = 1
        # Frames that may trail a process we already finished (7.3.5, 7.5).
        self._stray_done = False
        self._stray_force_killed = False
        self._reconnectable = False
        self._ever_running = False
        self._restored = False
        self._kill_sandbox_pending = False
        self._checkpoint_pending = False
        self._snapshot_pending = False
        self._leaving_reason: str | None = None
        self._last_seq = 0
        self._reconnect_attempt = 0
        self._lost_at: float | None = None
        self._was_reconnecting = False
        self._process_at_drop = False
        self._session_ended = False

    # ------------------------------------------------------------------
    # introspection

    def __repr__(self) -> str:
        return f"<ClientProtocol {self.sandbox_id or '(new)'} {self.state.value}>"

    @property
    def process_state(self) -> ProcessState | None:
        return self._process.state if self._process else None

    @property
    def is_ended(self) -> bool:
        return self.state in _ENDED

    def _debug(self, msg: str, *args: object) -> None:
        if self._log.isEnabledFor(logging.DEBUG):
            prefix = f"[{self._label}] " if self._label else ""
            self._log.debug(prefix + redact(msg % args if args else msg, self.sandbox_token))

    # ------------------------------------------------------------------
    # outputs

    @property
    def has_data_to_send(self) -> bool:
        """Cheap check, so an adapter need not take its send lock for nothing."""
        return bool(self._outgoing)

    def data_to_send(self) -> list[str]:
        out, self._outgoing = self._outgoing, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _send(self, frame: ClientFrame) -> None:
        if isinstance(frame, StdinRequest):
            self._debug("send stdin (%d chars)", len(frame.data))
        else:
            self._debug("send %r", frame)
        self._outgoing.append(encode_client_frame(frame))

    # ------------------------------------------------------------------
    # connection lifecycle

    def handshake(self) -> Handshake:
        """The URL and headers of the next WebSocket to open (first connect or reconnect)."""
        headers = dict(self._user_headers)
        if self.sandbox_id is None:
            url = create_url(self._base)
        else:
            if not self.sandbox_token:
                raise LocalProtocolError("the server sent no sandbox_token; this sandbox cannot be attached")
            url = attach_url(self._base, self.sandbox_id, self.sandbox_token)
            cookie = cookie_header(self._cookies)
            if cookie:
                headers["Cookie"] = cookie
        return Handshake(url, headers, redact(url))

    def connection_opened(self, set_cookies: Iterable[str] = ()) -> None:
        """The WebSocket handshake succeeded; ``set_cookies`` are its Set-Cookie values."""
        merge_set_cookies(self._cookies, set_cookies)
        self.extensions = frozenset()
        if self.state is SandboxState.RECONNECTING:
            self._debug("reconnected socket open")
            self._was_reconnecting = True
            self.state = SandboxState.ATTACHING
            return
        if self.state is not SandboxState.CONNECTING:
            raise LocalProtocolError(f"connection_opened in state {self.state.value}")
        if self._init is not None:
            self.state = SandboxState.CREATING
            self._send(self._init)
        else:
            self.state = SandboxState.ATTACHING

    def connection_failed(self, error: SandboxException, *, now: float, http_status: int | None = None) -> None:
        """The handshake failed (refused, timed out, unreachable)."""
        if self._was_reconnecting or self.state is SandboxState.RECONNECTING:
            self.state = SandboxState.RECONNECTING
            if http_status in NON_RETRYABLE_HTTP_STATUSES:
                self.state = SandboxState.FAILED  # not "reconnecting" forever: the session is over
                self._end(error)
                return
            self._schedule_reconnect(now, error)
            return
        self.state = SandboxState.FAILED
        self._emit(SetupFailed(error))
        self._end(error)

    def connection_closed(self, code: int, reason: str = "", *, now: float = 0.0) -> None:
        """The socket is closed (1006 for an abnormal loss)."""
        self._debug("connection closed: %s %s", code, reason)
        self._flush_pending_errors()
        if self.state in _ENDED:
            self._end(None if self.state is not SandboxState.FAILED else self._session_error(code))
            return
        if self._kill_sandbox_pending:
            # A close is a valid end of kill_sandbox (the sandbox may already be gone, 7.6).
            self._kill_sandbox_pending = False
            self.state = SandboxState.KILLED
            self._emit(KillSandboxDone(None))
            self._end(None)
            return
        error = self._session_error(code)
        if self.state in _SETUP and not self._was_reconnecting:
            self.state = SandboxState.FAILED
            self._emit(SetupFailed(error))
            self._end(error)
            return
        if self._checkpoint_pending:
            self._checkpoint_pending = False
            self.state = SandboxState.FAILED
            self._emit(CheckpointDone(SandboxCheckpointError(f"connection closed (code {code}) during checkpoint")))
            self._end(error)
            return
        if self.auto_reconnect and self._reconnectable and self._leaving_reason is None:
            if self._snapshot_pending:
                self._snapshot_pending = False
                self._emit(SnapshotDone(SandboxFilesystemSnapshotError("connection lost during the snapshot")))
            proc = self._process
            if proc and proc.state is ProcessState.STARTING and not self._was_reconnecting:
                # Unknown whether the exec request reached the server: do not guess.
                self._finish_process(
                    ExecRejected(proc.exec_id, SandboxConnectionError("connection lost before the exec started"))
                )
            if not self._was_reconnecting:
                self._process_at_drop = self._process is not None and self._process.state is not ProcessState.DONE
            self.state = SandboxState.RECONNECTING
            if self._lost_at is None:
                self._lost_at = now
            self._schedule_reconnect(now, error)
            return
        self.state = SandboxState.FAILED
        self._end(error)

    def _session_error(self, code: int) -> SandboxException:
        if self._leaving_reason:
            return SandboxDeletedError(self._leaving_reason)
        return SandboxConnectionError(f"connection closed (code {code})")

    def _schedule_reconnect(self, now: float, error: SandboxException) -> None:
        lost_at = self._lost_at if self._lost_at is not None else now
        self._lost_at = lost_at
        self._reconnect_attempt += 1
        delay = self.reconnect_policy.delay(self._reconnect_attempt, self._rng)
        if now + delay - lost_at > self.reconnect_policy.deadline:
            self.state = SandboxState.FAILED
            self._end(
                SandboxConnectionError(f"gave up reconnecting after {self._reconnect_attempt - 1} attempts: {error}")
            )
            return
        self._debug("reconnect attempt %d in %.2fs", self._reconnect_attempt, delay)
        self._emit(ReconnectScheduled(delay, self._reconnect_attempt))

    # ------------------------------------------------------------------
    # inbound frames

    def receive(self, text: str | bytes) -> None:
        """Feed one message from the server."""
        try:
            obj = load_json(text)
        except RemoteProtocolError as exc:
            self._log.warning("ignoring malformed frame from the server: %s", exc)
            return
        # Fast path for the flood case, stdout/stderr (decoded once, typed checks
        # inline); anything unusual goes through the full decoder below.
        if type(obj) is dict:
            event = obj.get("event")
            if event == "stdout" or event == "stderr":
                data = obj.get("data")
                seq = obj.get("seq")
                state = self.state
                if (
                    type(data) is str
                    and (seq is None or type(seq) is int)
                    and (state is SandboxState.RUNNING or state not in _ENDED)
                ):
                    self._output(event, data, seq)
                    return
        try:
            frame = decode_server_object(obj)
        except RemoteProtocolError as exc:
            self._log.warning("ignoring malformed frame from the server: %s", exc)
            return
        if self.state in _ENDED:
            self._debug("ignoring %r after the session ended", frame)
            return
        if isinstance(frame, OutputFrame):
            self._on_output(frame)
        elif isinstance(frame, StatusFrame):
            self._debug("status %s", frame.status)
            self._on_status(frame)
        elif isinstance(frame, ErrorFrame):
            self._on_error_frame(frame.message)
        elif isinstance(frame, SandboxIdFrame):
            self._on_sandbox_id(frame)
        elif isinstance(frame, OutputGapFrame):
            if self._process is not None:
                self._emit(OutputIncomplete(self._process.exec_id))
        elif isinstance(frame, UnknownFrame):
            self._debug("ignoring unknown event %r", frame.event)

    def _on_sandbox_id(self, frame: SandboxIdFrame) -> None:
        if self.state is not SandboxState.CREATING or self.sandbox_id is not None:
            self._log.warning("ignoring unexpected sandbox_id frame in state %s", self.state.value)
            return
        self.sandbox_id = frame.sandbox_id
        self.sandbox_token = frame.sandbox_token

    def _on_output(self, frame: OutputFrame) -> None:
        self._output(frame.stream, frame.data, frame.seq)

    def _output(self, stream: Stream, data: str, seq: int | None) -> None:
        if seq is not None and EXT_SEQ in self.extensions:
            if seq <= self._last_seq:
                return  # replayed twice: already delivered
            self._last_seq = seq
        proc = self._process
        if proc is None or proc.state is ProcessState.STARTING or proc.state is ProcessState.DONE:
            self._debug("dropping %s output with no running process", stream)
            return
        self._events.append(Output(proc.exec_id, stream, data))

    def _on_status(self, frame: StatusFrame) -> None:
        status = frame.status
        if not isinstance(status, Status):
            self._log.info("ignoring unknown status %r", status)
            return
        if status in FATAL_STATUSES:
            self._reconnectable = False
        if status in _PROCESS_STATUSES:
            self._on_process_status(frame)
            return
        handler = _SANDBOX_HANDLERS.get(status)
        if handler is not None:
            handler(self, frame)
        elif status in ERROR_FRAME_STATUSES:
            self._expect_error_frame(status, "log")

    # -- setup

    def _on_running(self, frame: StatusFrame) -> None:
        if self.state not in _SETUP:
            self._debug("ignoring SANDBOX_RUNNING in state %s", self.state.value)
            return
        if self.sandbox_id is None:
            self.state = SandboxState.FAILED
            err = SandboxCreationError("the server reported SANDBOX_RUNNING without a sandbox id")
            self._emit(SetupFailed(err))
            self._emit(CloseConnection(1000))
            self._end(err)
            return
        self.extensions = _extension_set(frame.extensions)
        self.state = SandboxState.RUNNING
        self._reconnectable = True
        self._ever_running = True
        self._lost_at = None
        self._reconnect_attempt = 0
        restored, self._restored = self._restored, False
        if not self._was_reconnecting:
            self._emit(SetupComplete(self.sandbox_id, restored))
            return
        self._was_reconnecting = False
        proc = self._process
        if proc is not None and proc.state is not ProcessState.DONE:
            if restored:
                # 7.10: a restore means the process did not survive the move.
                self._finish_process(
                    ProcessEnded(
                        proc.exec_id,
                        None,
                        SandboxConnectionError("the sandbox was restored elsewhere; the process is gone"),
                    )
                )
            elif self._process_at_drop:
                last_seq = self._last_seq if EXT_SEQ in self.extensions else None
                self._send(ReconnectRequest(last_seq))
                if last_seq is None:
                    self._emit(OutputIncomplete(proc.exec_id))
                self._flush_stdin(proc)
        self._process_at_drop = False
        self._emit(Reconnected(restored))

    def _on_restoring(self, frame: StatusFrame) -> None:
        if self.state in _SETUP:
            self.state = SandboxState.RESTORING
            self._restored = True

    def _on_setup_refused(self, frame: StatusFrame) -> None:
        status = frame.status
        assert isinstance(status, Status)
        if self.state not in _SETUP:
            self._log.warning("ignoring %s outside setup", status)
            return
        if status is Status.SANDBOX_IN_USE and self._was_reconnecting:
            # Transient: the server has not yet noticed our old socket died (7.12).
            self._reconnectable = True
            return
        if status in ERROR_FRAME_STATUSES:
            self._expect_error_frame(status, "setup")
        else:
            self._fail_setup(status, None)

    def _fail_setup(self, status: Status, message: str | None) -> None:
        if self.state in _ENDED:
            return
        text = f"{status.value}: {message}" if message else status.value
        err = SandboxCreationError(text, status=status, server_message=message)
        self.state = SandboxState.FAILED
        if self._was_reconnecting:
            self._end(err)
        else:
            self._emit(SetupFailed(err))
            self._end(err)
        self._emit(CloseConnection(1000))

    # -- lifecycle

    def _on_deleted(self, frame: StatusFrame) -> None:
        if self._checkpoint_pending or self._kill_sandbox_pending:
            return  # part of the sequence we asked for (7.6, 7.7)
        reason = self._leaving_reason or "the server deleted the sandbox (idle timeout or lost lock)"
        self._server_ended(reason)

    def _on_lock_release_requested(self, frame: StatusFrame) -> None:
        if self._checkpoint_pending or self._kill_sandbox_pending:
            return
        self._server_ended("the sandbox is being handed off to another connection")

    def _on_lock_renewal_error(self, frame: StatusFrame) -> None:
        self._leaving_reason = "the server lost the sandbox's lock; it is being deleted"

    def _server_ended(self, reason: str) -> None:
        self._leaving_reason = reason
        self.state = SandboxState.FAILED
        err = SandboxDeletedError(reason)
        self._end(err)
        self._emit(CloseConnection(1000))

    def _on_killed(self, frame: StatusFrame) -> None:
        if not self._kill_sandbox_pending:
            return
        self._kill_sandbox_pending = False
        self.state = SandboxState.KILLED
        err = None
        if frame.status is Status.SANDBOX_KILL_ERROR:
            err = SandboxStateError("the server reported SANDBOX_KILL_ERROR", status=frame.status)
        self._emit(KillSandboxDone(err))
        self._end(None)
        self._emit(CloseConnection(1000))

    def _on_checkpointed(self, frame: StatusFrame) -> None:
        if not self._checkpoint_pending:
            self._server_ended(self._leaving_reason or "the sandbox was checkpointed by the server")
            return
        self._checkpoint_pending = False
        self.state = SandboxState.CHECKPOINTED
        self._emit(CheckpointDone(None))
        self._end(None)
        self._emit(CloseConnection(1000))

    def _on_checkpoint_error(self, frame: StatusFrame) -> None:
        assert isinstance(frame.status, Status)
        if self._checkpoint_pending:
            self._expect_error_frame(frame.status, "checkpoint")
        # Unrequested: a failed handoff checkpoint, no error frame follows (6.1).

    def _on_snapshot_created(self, frame: StatusFrame) -> None:
        if self._snapshot_pending:
            self._snapshot_pending = False
            self._emit(SnapshotDone(None))

    def _on_snapshot_error(self, frame: StatusFrame) -> None:
        assert isinstance(frame.status, Status)
        self._expect_error_frame(frame.status, "snapshot" if self._snapshot_pending else "log")

    def _on_sandbox_error(self, frame: StatusFrame) -> None:
        kind = "snapshot" if self._snapshot_pending else "log"
        self._expect_error_frame(Status.SANDBOX_ERROR, kind)

    # -- the active process

    def _on_process_status(self, frame: StatusFrame) -> None:
        status = frame.status
        proc = self._process
        if proc is None or proc.state is ProcessState.DONE:
            if status in ERROR_FRAME_STATUSES:
                self._expect_error_frame(status, "log")  # type: ignore[arg-type]
            self._consume_stray(status)
            return
        if proc.state is ProcessState.STARTING:
            if status is Status.SANDBOX_EXECUTION_RUNNING:
                proc.state = ProcessState.RUNNING
                self._stray_done = self._stray_force_killed = False
                self._emit(ExecStarted(proc.exec_id))
                self._flush_stdin(proc)
                if proc.kill_requested:
                    self._send_kill(proc)
            elif status in (Status.SANDBOX_EXECUTION_ERROR, Status.SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR):
                self._expect_error_frame(status, "exec")  # type: ignore[arg-type]
            else:
                # A DONE or FORCE_KILLED before our first status belongs to an earlier exec.
                self._debug("ignoring %s before the exec started", status)
            return
        if status is Status.SANDBOX_EXECUTION_DONE:
            if proc.kill_sent and not proc.force_killed_seen:
                self._stray_force_killed = True
            # 15: use an extension only when advertised on this connection.
            exit_code = frame.exit_code if EXT_EXIT_CODE in self.extensions else None
            self._finish_process(ProcessEnded(proc.exec_id, exit_code, None))
        elif status is Status.SANDBOX_EXECUTION_FORCE_KILLED:
            proc.force_killed_seen = True
            proc.state = ProcessState.KILLING
        elif status is Status.SANDBOX_EXECUTION_FORCE_KILL_ERROR:
            if proc.kill_sent:
                proc.kill_sent = proc.kill_requested = False
                proc.state = ProcessState.RUNNING
                self._emit(
                    KillProcessFailed(
                        proc.exec_id, SandboxExecutionError("the server could not kill the process", status=status)
                    )
                )
        elif status is Status.SANDBOX_EXECUTION_RUNNING:
            pass  # the duplicate that starts a reconnect reply (7.12)
        elif status in ERROR_FRAME_STATUSES:
            # STDIN_ERROR, or an EXECUTION_ERROR about a request we did not make.
            self._expect_error_frame(status, "log")  # type: ignore[arg-type]

    def _consume_stray(self, status: Status | str) -> None:
        if status is Status.SANDBOX_EXECUTION_DONE and self._stray_done:
            self._stray_done = False
        elif status is Status.SANDBOX_EXECUTION_FORCE_KILLED and self._stray_force_killed:
            self._stray_force_killed = False
        else:
            self._debug("ignoring %s with no active process", status)

    def _finish_process(self, event: ProcessEnded | ExecRejected) -> None:
        proc = self._process
        if proc is None or proc.state is ProcessState.DONE:
            return
        proc.state = ProcessState.DONE
        proc.stdin_buffer.clear()
        self._emit(event)

    # -- error frames

    def _expect_error_frame(self, status: Status, kind: str) -> None:
        self._pending_errors.append(_PendingError(status, kind))

    def _on_error_frame(self, message: str) -> None:
        if not self._pending_errors:
            self._log.info("server error with no status to attach it to: %s", message)
            return
        pending = self._pending_errors.pop()  # the most recent status that lacks one (6.1)
        self._resolve_error(pending, message)

    def _flush_pending_errors(self) -> None:
        pending, self._pending_errors = self._pending_errors, []
        for item in pending:
            self._resolve_error(item, None)

    def _resolve_error(self, pending: _PendingError, message: str | None) -> None:
        status = pending.status
        text = f"{status.value}: {message}" if message else status.value
        if pending.kind == "setup":
            self._fail_setup(status, message)
        elif pending.kind == "exec":
            proc = self._process
            if proc is not None and proc.state is ProcessState.STARTING:
                # A DONE follows only if nothing else was running (7.3.5).
                self._stray_done = True
                err = SandboxExecutionError(text, status=status, server_message=message)
                self._finish_process(ExecRejected(proc.exec_id, err))
        elif pending.kind == "checkpoint":
            self._checkpoint_pending = False
            err2 = SandboxCheckpointError(text, status=status, server_message=message)
            if status is Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR:
                self.state = SandboxState.RUNNING
            self._emit(CheckpointDone(err2))
        elif pending.kind == "snapshot":
            self._snapshot_pending = False
            self._emit(SnapshotDone(SandboxFilesystemSnapshotError(text, status=status, server_message=message)))
        else:
            self._log.warning("server reported %s", text)

    # ------------------------------------------------------------------
    # user actions

    def _require_running(self, what: str) -> None:
        if self.state is SandboxState.RUNNING:
            return
        if self.state is SandboxState.RECONNECTING or (self._was_reconnecting and self.state in _SETUP):
            raise LocalProtocolError(f"cannot {what} while reconnecting; retry when the sandbox is running again")
        raise LocalProtocolError(f"cannot {what}: the sandbox is {self.state.value}, not running")

    def exec(self, language: str, code: str) -> int:
        """Start an exec; returns its id. Allowed when running and no process is active."""
        self._require_running("exec")
        if self._process is not None and self._process.state is not ProcessState.DONE:
            raise LocalProtocolError("another process is still running in this sandbox; wait for it or kill it first")
        exec_id = self._next_exec_id
        self._next_exec_id += 1
        self._process = _Process(exec_id)
        self._send(ExecRequest(language, code))
        return exec_id

    def _current(self, exec_id: int) -> _Process:
        proc = self._process
        if proc is None or proc.exec_id != exec_id or proc.state is ProcessState.DONE:
            raise LocalProtocolError("the process has finished")
        return proc

    def write_stdin(self, exec_id: int, data: str) -> None:
        """Send stdin; kept in order until the process runs and while reconnecting (7.4)."""
        proc = self._current(exec_id)
        if self.state in _ENDED:
            raise LocalProtocolError(f"the sandbox is {self.state.value}")
        if proc.state is ProcessState.STARTING or self.state is not SandboxState.RUNNING or proc.stdin_buffer:
            proc.stdin_buffer.append(data)
            return
        self._send(StdinRequest(data))

    def _flush_stdin(self, proc: _Process) -> None:
        buffered, proc.stdin_buffer = proc.stdin_buffer, []
        for data in buffered:
            self._send(StdinRequest(data))

    def close_stdin(self, exec_id: int) -> None:
        """Extension ``close_stdin``; raises if the server did not advertise it."""
        proc = self._current(exec_id)
        if EXT_CLOSE_STDIN not in self.extensions:
            raise LocalProtocolError("this server cannot close stdin (no close_stdin extension)")
        if proc.state is ProcessState.STARTING or proc.stdin_buffer:
            raise LocalProtocolError("cannot close stdin before the process has started and its input is sent")
        self._send(CloseStdinRequest())

    def kill_process(self, exec_id: int) -> None:
        """Ask for the process to be killed; deferred until it has started (7.5)."""
        proc = self._process
        if proc is None or proc.exec_id != exec_id or proc.state is ProcessState.DONE:
            return  # already over: nothing to kill
        proc.kill_requested = True
        if proc.state is not ProcessState.STARTING and self.state is SandboxState.RUNNING:
            self._send_kill(proc)

    def _send_kill(self, proc: _Process) -> None:
        if not proc.kill_sent:
            proc.kill_sent = True
            self._send(KillProcessRequest())

    def kill_process_timed_out(self, exec_id: int) -> None:
        """The adapter gave up waiting for the kill: end the process locally."""
        proc = self._process
        if proc is None or proc.exec_id != exec_id or proc.state is ProcessState.DONE:
            return
        self._stray_done = True
        self._stray_force_killed = not proc.force_killed_seen
        self._finish_process(ProcessEnded(exec_id, None, None))

    def kill_sandbox(self) -> None:
        if self.state in _ENDED:
            return
        if self.state is not SandboxState.RUNNING or self._kill_sandbox_pending:
            # Not connected to a live sandbox: just end the session locally.
            self.close()
            return
        self._kill_sandbox_pending = True
        self._reconnectable = False
        self._send(KillSandboxRequest())

    def kill_sandbox_timed_out(self) -> None:
        if not self._kill_sandbox_pending:
            return  # the kill already completed (or was never sent): a late timer is a no-op
        self._kill_sandbox_pending = False
        self.state = SandboxState.KILLED
        self._emit(KillSandboxDone(None))
        self._end(None)
        self._emit(CloseConnection(1000, abort=True))

    def checkpoint(self) -> None:
        self._require_running("checkpoint")
        if self._checkpoint_pending:
            raise LocalProtocolError("a checkpoint is already in progress")
        self._checkpoint_pending = True
        self.state = SandboxState.CHECKPOINTING
        self._send(CheckpointRequest())

    def snapshot_filesystem(self, name: str) -> None:
        self._require_running("snapshot the filesystem")
        if self._snapshot_pending:
            raise LocalProtocolError("a snapshot is already in progress")
        self._snapshot_pending = True
        self._send(SnapshotRequest(name))

    def operation_timed_out(self, what: str) -> None:
        """A setup or checkpoint wait timed out: the session cannot be trusted any more."""
        if self.state in _ENDED:
            return
        self.state = SandboxState.FAILED
        self._checkpoint_pending = False
        err = SandboxConnectionError(f"{what} timed out")
        self._end(err)
        self._emit(CloseConnection(1000, abort=True))

    def snapshot_timed_out(self) -> None:
        self._snapshot_pending = False

    def close(self) -> None:
        """Detach: end the session locally and leave the sandbox running on the server."""
        if self.state in _ENDED:
            return
        self.state = SandboxState.CLOSED
        self._end(SandboxStateError("the sandbox connection was closed"))
        self._emit(CloseConnection(1000))

    # ------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _end(self, error: SandboxException | None) -> None:
        """Wake every waiter: nothing further will happen on this session."""
        if self._session_ended:
            return
        self._session_ended = True
        self._reconnectable = False
        self._pending_errors.clear()
        cause = error or SandboxStateError(f"the sandbox is {self.state.value}")
        proc = self._process
        if proc is not None and proc.state is not ProcessState.DONE:
            if proc.state is ProcessState.STARTING:
                self._finish_process(ExecRejected(proc.exec_id, cause))
            else:
                self._finish_process(ProcessEnded(proc.exec_id, None, error))
        if self._checkpoint_pending:
            self._checkpoint_pending = False
            self._emit(CheckpointDone(SandboxCheckpointError(f"checkpoint did not complete: {cause}")))
        if self._snapshot_pending:
            self._snapshot_pending = False
            self._emit(SnapshotDone(SandboxFilesystemSnapshotError(f"snapshot did not complete: {cause}")))
        if self._kill_sandbox_pending:
            self._kill_sandbox_pending = False
            self._emit(KillSandboxDone(None))
        self._emit(SessionEnded(error))


_SANDBOX_HANDLERS = {
    Status.SANDBOX_RUNNING: ClientProtocol._on_running,
    Status.SANDBOX_RESTORING: ClientProtocol._on_restoring,
    Status.SANDBOX_NOT_FOUND: ClientProtocol._on_setup_refused,
    Status.SANDBOX_IN_USE: ClientProtocol._on_setup_refused,
    Status.SANDBOX_CREATION_ERROR: ClientProtocol._on_setup_refused,
    Status.SANDBOX_PERMISSION_DENIAL_ERROR: ClientProtocol._on_setup_refused,
    Status.SANDBOX_RESTORE_ERROR: ClientProtocol._on_setup_refused,
    Status.SANDBOX_DELETED: ClientProtocol._on_deleted,
    Status.SANDBOX_LOCK_RELEASE_REQUESTED: ClientProtocol._on_lock_release_requested,
    Status.SANDBOX_LOCK_RENEWAL_ERROR: ClientProtocol._on_lock_renewal_error,
    Status.SANDBOX_KILLED: ClientProtocol._on_killed,
    Status.SANDBOX_KILL_ERROR: ClientProtocol._on_killed,
    Status.SANDBOX_CHECKPOINTED: ClientProtocol._on_checkpointed,
    Status.SANDBOX_CHECKPOINT_ERROR: ClientProtocol._on_checkpoint_error,
    Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR: ClientProtocol._on_checkpoint_error,
    Status.SANDBOX_FILESYSTEM_SNAPSHOT_CREATED: ClientProtocol._on_snapshot_created,
    Status.SANDBOX_FILESYSTEM_SNAPSHOT_ERROR: ClientProtocol._on_snapshot_error,
    Status.SANDBOX_ERROR: ClientProtocol._on_sandbox_error,
}
