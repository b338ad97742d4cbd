"""The client role: every decision a sandbox client makes, with no I/O.

Rules of this file (after h11's ``_state.py``):

* All client-side protocol state lives here and in the objects it owns: the
  per-socket :class:`~._connection.Connection` (made anew for every socket,
  so a drop resets it by construction) and the per-exec
  :class:`~._exec.Exec` sub-machine. Adapters keep none.
* What a user call does in each sandbox state is written once, in
  :data:`CALL_TABLE`. Ended states absorb: after :class:`SessionEnded`
  nothing changes state again, whatever arrives late.
* Inputs are method calls: what arrived (``receive``, ``connection_opened``,
  ``connection_closed``, ``connection_failed``, ``send_failed``), what the
  user asked (``exec``, ``write_stdin``, ...), and timers that ran out.
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
from typing import Any

from ._connection import Connection, PendingError
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
from ._events import (
    CheckpointDone,
    CloseConnection,
    Event,
    ExecRejected,
    ExecStarted,
    KillProcessFailed,
    KillSandboxDone,
    Output,
    OutputIncomplete,
    ProcessEnded,
    Reconnected,
    ReconnectScheduled,
    SessionEnded,
    SetupComplete,
    SetupFailed,
    SnapshotDone,
    StdinIncomplete,
)
from ._exec import Exec, ProcessState, StdinItem, Wire
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
    StdinAckFrame,
    StdinRequest,
    Stream,
    UnknownFrame,
    decode_server_object,
    encode_client_frame,
    encode_exec_request,
    load_json,
    scan_json,
)
from ._reconnect import NON_RETRYABLE_HTTP_STATUSES, SHARED_RNG, Handshake, ReconnectPolicy
from ._status import ERROR_FRAME_STATUSES, FATAL_STATUSES, Status
from ._url import attach_url, cookie_header, create_url, merge_set_cookies, redact, websocket_base

logger = logging.getLogger("sandbox_proto.client")

EXT_EXIT_CODE = "exit_code"
EXT_SEQ = "seq"
EXT_CLOSE_STDIN = "close_stdin"
EXT_STDIN_SEQ = "stdin_seq"
EXT_EXEC_REF = "exec_ref"
#: Every extension this client implements: what it asks for by default on each handshake.
CLIENT_EXTENSIONS = frozenset({EXT_EXIT_CODE, EXT_SEQ, EXT_CLOSE_STDIN, EXT_STDIN_SEQ, EXT_EXEC_REF})

_EXTENSION_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def _extension_set(names: tuple[str, ...] | None, requested: frozenset[str]) -> frozenset[str]:
    """One shared frozenset per distinct grant: every sandbox of a server gets the same one."""
    key = tuple(name for name in names or () if name in requested)
    found = _EXTENSION_SETS.get(key)
    if found is None:
        found = frozenset(key)
        if len(_EXTENSION_SETS) < 64:  # bounded: servers advertise a handful of lists
            _EXTENSION_SETS[key] = found
    return found


class SandboxState(enum.Enum):
    # Enum's own __hash__ is a Python function; members are singletons that compare by
    # identity, and CALL_TABLE and the sets of states are probed several times per exec.
    __hash__ = object.__hash__

    CONNECTING = "connecting"
    CREATING = "creating"
    ATTACHING = "attaching"
    RESTORING = "restoring"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    #: From a drop until the sandbox is running again on a new socket (handshake and reattach included).
    RECONNECTING = "reconnecting"
    CHECKPOINTED = "checkpointed"
    KILLED = "killed"
    CLOSED = "closed"
    FAILED = "failed"


_ENDED = frozenset({SandboxState.CHECKPOINTED, SandboxState.KILLED, SandboxState.CLOSED, SandboxState.FAILED})
_SETUP = frozenset({SandboxState.CONNECTING, SandboxState.CREATING, SandboxState.ATTACHING, SandboxState.RESTORING})
#: A socket on which the sandbox is running: requests can be handed to it.
_CONNECTED = frozenset({SandboxState.RUNNING, SandboxState.CHECKPOINTING})
#: Statuses about the active process: those of its lifecycle, and a stdin failure.
_PROCESS_STATUSES = frozenset(
    status
    for status in Status
    if status is Status.SANDBOX_STDIN_ERROR
    or (status.name.startswith("SANDBOX_EXECUTION_") and status is not Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR)
)

#: The two statuses of every exec, by wire value: those :meth:`ClientProtocol.receive` takes fast.
_EXEC_STATUSES = {status.value: status for status in (Status.SANDBOX_EXECUTION_RUNNING, Status.SANDBOX_EXECUTION_DONE)}
#: Their exact texts as the server writes them (1.2), with the exit codes of a process's own
#: exit and of signals: recognised whole, a parse saved on each.
_EXEC_STATUS_TEXTS: dict[str, tuple[Status, int | None]] = {
    '{"event":"status_update","status":"SANDBOX_EXECUTION_RUNNING"}': (Status.SANDBOX_EXECUTION_RUNNING, None),
    '{"event":"status_update","status":"SANDBOX_EXECUTION_DONE"}': (Status.SANDBOX_EXECUTION_DONE, None),
    **{
        f'{{"event":"status_update","status":"SANDBOX_EXECUTION_DONE","exit_code":{code}}}': (
            Status.SANDBOX_EXECUTION_DONE,
            code,
        )
        for code in range(-64, 256)
    },
}
#: Other lengths are not looked up: most stdout frames pay no hash of their text.
_EXEC_STATUS_TEXT_MIN = min(map(len, _EXEC_STATUS_TEXTS))
_EXEC_STATUS_TEXT_MAX = max(map(len, _EXEC_STATUS_TEXTS))

# --------------------------------------------------------------------------
# the table of user calls


class Call(enum.Enum):
    __hash__ = object.__hash__  # as SandboxState's: a CALL_TABLE key

    EXEC = "exec"
    STDIN = "write to stdin"
    CLOSE_STDIN = "close stdin"
    KILL_PROCESS = "kill the process"
    KILL_SANDBOX = "kill the sandbox"
    CHECKPOINT = "checkpoint"
    SNAPSHOT = "snapshot the filesystem"
    CLOSE = "close"


class Verdict(enum.Enum):
    SEND = "send"  # connected: hand the request to the socket now
    HOLD = "hold"  # remembered, and sent in order once the sandbox is running again
    REFUSE = "refuse"  # LocalProtocolError, saying which state allows it
    IGNORE = "ignore"  # nothing to do (nothing left to kill or close)
    END = "end"  # end the session locally


def _row(default: Verdict, **overrides: Verdict) -> dict[Call, Verdict]:
    return {call: overrides.get(call.name, default) for call in Call}


_SETUP_ROW = _row(Verdict.REFUSE, KILL_PROCESS=Verdict.IGNORE, KILL_SANDBOX=Verdict.END, CLOSE=Verdict.END)
_ENDED_ROW = _row(Verdict.REFUSE, KILL_PROCESS=Verdict.IGNORE, KILL_SANDBOX=Verdict.IGNORE, CLOSE=Verdict.IGNORE)

#: What every user call does in every state: the one place this is decided.
CALL_TABLE: dict[SandboxState, dict[Call, Verdict]] = {
    SandboxState.CONNECTING: _SETUP_ROW,
    SandboxState.CREATING: _SETUP_ROW,
    SandboxState.ATTACHING: _SETUP_ROW,
    SandboxState.RESTORING: _SETUP_ROW,
    SandboxState.RUNNING: _row(Verdict.SEND, CLOSE=Verdict.END),
    # Stdin and kills go on: a running process makes the server refuse the checkpoint anyway.
    SandboxState.CHECKPOINTING: _row(
        Verdict.SEND, EXEC=Verdict.REFUSE, CHECKPOINT=Verdict.REFUSE, SNAPSHOT=Verdict.REFUSE, CLOSE=Verdict.END
    ),
    SandboxState.RECONNECTING: _row(Verdict.HOLD, CLOSE=Verdict.END),
    SandboxState.CHECKPOINTED: _ENDED_ROW,
    SandboxState.KILLED: _ENDED_ROW,
    SandboxState.CLOSED: _ENDED_ROW,
    SandboxState.FAILED: _ENDED_ROW,
}

# The members the per-exec and per-frame paths compare with, as globals: on Python 3.11
# ``Enum.MEMBER`` goes through EnumType.__getattr__'s slow lookup (~1,100 instructions;
# it was a third of the core's cost of an exec).
_RUNNING = SandboxState.RUNNING
_P_STARTING = ProcessState.STARTING
_P_RUNNING = ProcessState.RUNNING
_P_KILLING = ProcessState.KILLING
_P_DONE = ProcessState.DONE
_W_NONE = Wire.NONE
_W_HELD = Wire.HELD
_W_HANDED = Wire.HANDED
_EXEC_RUNNING = Status.SANDBOX_EXECUTION_RUNNING
_EXEC_DONE = Status.SANDBOX_EXECUTION_DONE
_V_SEND = Verdict.SEND
_V_REFUSE = Verdict.REFUSE
_C_EXEC = Call.EXEC

# What a frame handed to a socket stood for, so one that never left can be taken back.
_Meta = tuple[str, Exec | None, StdinItem | None]
_NO_META: _Meta = ("", None, None)
#: Not a JSON value: ``receive`` has not parsed the frame (yet).
_UNPARSED = object()


class ClientProtocol:
    """One sandbox session seen from the client: create or attach, then reconnects."""

    # Slots: one per sandbox, so its fields cost ~1.2 KiB less than a __dict__.
    __slots__ = (
        "_base",
        "_checkpoint",
        "_conn",
        "_cookies",
        "_events",
        "_handed_meta",
        "_init",
        "_kill_sandbox",
        "_label",
        "_last_seq",
        "_leaving_reason",
        "_log",
        "_lost_at",
        "_next_exec_id",
        "_outgoing",
        "_outgoing_meta",
        "_process",
        "_queued_exec",
        "_reconnect_attempt",
        "_reconnectable",
        "_requested",
        "_rng",
        "_sandbox_survives",
        "_session_ended",
        "_snapshot",
        "_snapshot_name",
        "_user_headers",
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
        extensions: Iterable[str] = CLIENT_EXTENSIONS,
    ) -> None:
        """``extensions``: those to ask the server for on every handshake (default: all this client implements)."""
        if (init is None) == (sandbox_id is None):
            raise LocalProtocolError("give either init (create) or sandbox_id (attach)")
        if sandbox_id is not None and not sandbox_token:
            raise LocalProtocolError("attach needs a non-empty sandbox_token")
        if isinstance(extensions, str):  # "seq" would be asked for as "s", "e", "q"
            raise LocalProtocolError("extensions must be a collection of names, not a string")
        requested = frozenset(extensions)
        if not requested <= CLIENT_EXTENSIONS:
            unknown = ", ".join(sorted(requested - CLIENT_EXTENSIONS))
            raise LocalProtocolError(f"this client does not implement the extension(s) {unknown}")
        #: Asked for on every handshake (create, attach, each reconnect's attach); only these can be granted.
        self._requested = requested
        self._base = websocket_base(url)
        self._init = init
        self.sandbox_id: str | None = sandbox_id
        self.sandbox_token: str | None = sandbox_token
        self.auto_reconnect = auto_reconnect
        self.reconnect_policy = reconnect_policy or ReconnectPolicy()
        self._user_headers = dict(headers or {})
        self._log = log or logger
        self._label = label
        self._rng = rng or SHARED_RNG

        self.state = SandboxState.CONNECTING
        #: Extensions the server granted on the last socket that reached ``SANDBOX_RUNNING``.
        self.extensions: frozenset[str] = frozenset()
        self._conn: Connection | None = None
        self._cookies: dict[str, str] = {}
        self._outgoing: list[str] = []
        self._outgoing_meta: list[_Meta] = []
        self._handed_meta: list[_Meta] = []
        self._events: list[Event] = []
        self._process: Exec | None = None
        #: An exec asked for while an abandoned one is still being killed: it starts after.
        self._queued_exec: Exec | None = None
        self._next_exec_id = 1
        self._reconnectable = False
        self._kill_sandbox = Wire.NONE
        self._checkpoint = Wire.NONE
        self._snapshot = Wire.NONE
        self._snapshot_name = ""
        self._leaving_reason: str | None = None
        #: The server let go of the sandbox without deleting it (handoff, checkpoint): a kill did not happen.
        self._sandbox_survives = False
        self._last_seq = 0
        self._reconnect_attempt = 0
        self._lost_at: float | None = None
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
        """The frames to write, in order. Report any that did not leave with :meth:`send_failed`."""
        out, self._outgoing = self._outgoing, []
        self._handed_meta, self._outgoing_meta = self._outgoing_meta, []
        return out

    def send_failed(self, unsent: list[str]) -> None:
        """The last ``unsent`` frames of the latest :meth:`data_to_send` did not leave.

        Call it before the next :meth:`data_to_send` (and before reporting the
        close that made the send fail). They go first again on this socket if
        it lives on; if it closes, :meth:`connection_closed` decides for each
        what follows: kept for the next socket, or its caller gets an error.
        Nobody is told a frame was sent when it was not.
        """
        if not unsent or self.state in _ENDED:
            return
        meta = self._handed_meta[len(self._handed_meta) - len(unsent) :]
        meta[:0] = [_NO_META] * (len(unsent) - len(meta))  # misuse must not misalign the rest
        self._outgoing[:0] = unsent
        self._outgoing_meta[:0] = meta
        self._handed_meta = []

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _send(self, frame: ClientFrame, meta: _Meta = _NO_META) -> None:
        if isinstance(frame, StdinRequest):
            self._debug("send stdin (%d chars)", len(frame.data))
        else:
            self._debug("send %r", frame)
        self._outgoing.append(encode_client_frame(frame))
        self._outgoing_meta.append(meta)

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    # ------------------------------------------------------------------
    # connection lifecycle

    def handshake(self) -> Handshake:
        """The URL and headers of the next WebSocket to open (first connect or reconnect)."""
        headers = dict(self._user_headers)
        if self.sandbox_id is None:
            url = create_url(self._base, self._requested)
        else:
            if not self.sandbox_token:
                raise LocalProtocolError("the server sent no sandbox_token; this sandbox cannot be attached")
            url = attach_url(self._base, self.sandbox_id, self.sandbox_token, self._requested)
            cookie = cookie_header(self._cookies)
            if cookie:
                headers["Cookie"] = cookie
        return Handshake(url, headers, redact(url))

    def connection_opened(self, set_cookies: Iterable[str] = ()) -> None:
        """The WebSocket handshake succeeded; ``set_cookies`` are its Set-Cookie values."""
        if self.state in _ENDED:
            # A handshake that completed after the session ended: close that socket at once.
            self._debug("closing a socket opened after the session ended")
            self._emit(CloseConnection(1000))
            return
        if self._conn is not None:
            raise LocalProtocolError("connection_opened while a socket is already open")
        merge_set_cookies(self._cookies, set_cookies)
        if self.state is SandboxState.RECONNECTING:
            self._debug("reconnected socket open")
            self._conn = Connection(reattach=True)
            return
        if self.state is not SandboxState.CONNECTING:
            raise LocalProtocolError(f"connection_opened in state {self.state.value}")
        self._conn = Connection(reattach=False)
        if self._init is not None:
            self.state = SandboxState.CREATING
            self._send(self._init)
        else:
            self.state = SandboxState.ATTACHING

    def connection_failed(self, error: SandboxException, *, now: float, http_status: int | None = None) -> None:
        """The handshake failed (refused, timed out, unreachable)."""
        if self.state in _ENDED:
            return
        if self.state is SandboxState.RECONNECTING:
            if http_status in NON_RETRYABLE_HTTP_STATUSES:
                self._fail(error)  # not "reconnecting" forever: the session is over
            else:
                self._schedule_reconnect(now, error)
            return
        self.state = SandboxState.FAILED
        self._emit(SetupFailed(error))
        self._end(error)

    def connection_closed(self, code: int, reason: str = "", *, now: float = 0.0) -> None:
        """The socket is closed (1006 for an abnormal loss)."""
        self._debug("connection closed: %s %s", code, reason)
        conn, self._conn = self._conn, None
        if self.state in _ENDED:
            return
        if conn is None:
            return  # no socket was open: a duplicate report
        self._take_back(self._outgoing_meta)
        self._outgoing, self._outgoing_meta = [], []
        for pending in conn.pending_errors:
            self._resolve_error(conn, pending, None)
        conn.pending_errors.clear()
        if self.state in _ENDED:
            return
        error = self._session_error(code)
        if self._kill_sandbox is Wire.HANDED:
            if code == 1000 or not self._can_reconnect():
                # A close is a valid end of kill_sandbox (the sandbox may already be gone, 7.6).
                self._kill_sandbox = Wire.NONE
                self.state = SandboxState.KILLED
                self._emit(KillSandboxDone(None))
                self._end(None)
                return
            self._kill_sandbox = Wire.HELD  # it may not have arrived: send it again once reattached
        if self.state in _SETUP:
            self.state = SandboxState.FAILED
            self._emit(SetupFailed(error))
            self._end(error)
            return
        if self._checkpoint is Wire.HANDED:
            self._checkpoint = Wire.NONE
            self.state = SandboxState.FAILED
            self._emit(CheckpointDone(SandboxCheckpointError(f"connection closed (code {code}) during checkpoint")))
            self._end(error)
            return
        if not self._can_reconnect():
            self._fail(error)
            return
        if self._snapshot is Wire.HANDED:
            self._snapshot = Wire.NONE
            self._emit(
                SnapshotDone(
                    SandboxFilesystemSnapshotError("connection lost during the snapshot; it may or may not exist")
                )
            )
        proc = self._process
        if proc is not None and proc.active and proc.unnumbered_handed:
            # Sent without a number into a socket that died: the server may never have read it.
            self._emit(StdinIncomplete(proc.exec_id))
        if self.state is not SandboxState.RECONNECTING:
            self.state = SandboxState.RECONNECTING
            self._lost_at = now
        self._schedule_reconnect(now, error)

    def _can_reconnect(self) -> bool:
        return self.auto_reconnect and self._reconnectable and self._leaving_reason is None

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
            self._fail(
                SandboxConnectionError(f"gave up reconnecting after {self._reconnect_attempt - 1} attempts: {error}")
            )
            return
        self._debug("reconnect attempt %d in %.2fs", self._reconnect_attempt, delay)
        self._emit(ReconnectScheduled(delay, self._reconnect_attempt))

    def _take_back(self, metas: list[_Meta]) -> None:
        """Frames that never left a socket that is now gone: their requests are held again."""
        for kind, proc, item in reversed(metas):
            if kind == "stdin":
                assert proc is not None and item is not None
                proc.give_back(item)
            elif kind == "exec":
                assert proc is not None
                if proc.request is Wire.HANDED:
                    proc.request = Wire.HELD
            elif kind == "kill":
                assert proc is not None
                if proc.kill is Wire.HANDED:
                    proc.kill = Wire.HELD
            elif kind == "kill_sandbox" and self._kill_sandbox is Wire.HANDED:
                self._kill_sandbox = Wire.HELD
            elif kind == "snapshot" and self._snapshot is Wire.HANDED:
                self._snapshot = Wire.HELD
            elif kind == "checkpoint" and self._checkpoint is Wire.HANDED:
                self._checkpoint = Wire.HELD
                if self.state is SandboxState.CHECKPOINTING:
                    self.state = SandboxState.RUNNING

    # ------------------------------------------------------------------
    # inbound frames

    def receive(self, text: str | bytes) -> None:
        """Feed one message from the server."""
        # Fast paths, each exactly what the full decoder below would conclude: the two
        # statuses of every exec recognised by their whole text (no parse), then, once
        # parsed, stdout/stderr (the flood case) and those statuses with extension
        # fields (typed checks inline, no frame object).
        obj: Any = _UNPARSED
        if type(text) is str:
            size = len(text)
            if _EXEC_STATUS_TEXT_MIN <= size <= _EXEC_STATUS_TEXT_MAX:
                known = _EXEC_STATUS_TEXTS.get(text)
                if known is not None and self._exec_status(known[0], None, known[1]):
                    return
            # load_json's own first step, inline: one call less per frame.
            try:
                obj, end = scan_json(text, 0)
            except (StopIteration, ValueError, RecursionError):
                end = -1
            if end != size:
                obj = _UNPARSED
        if obj is _UNPARSED:
            try:
                obj = load_json(text)
            except RemoteProtocolError as exc:
                self._log.warning("ignoring malformed frame from the server: %s", exc)
                return
        if type(obj) is dict:
            event = obj.get("event")
            if event == "stdout" or event == "stderr":
                data = obj.get("data")
                seq = obj.get("seq")
                state = self.state
                if (
                    type(data) is str
                    and (seq is None or type(seq) is int)
                    and (state is _RUNNING or state not in _ENDED)
                ):
                    self._output(event, data, seq)
                    return
            elif event == "status_update":
                value = obj.get("status")
                status = _EXEC_STATUSES.get(value) if type(value) is str else None
                ref = obj.get("ref")
                exit_code = obj.get("exit_code")
                if (
                    status is not None
                    and (ref is None or type(ref) is str)
                    and (exit_code is None or type(exit_code) is int)
                    and obj.get("extensions") is None
                    and self._exec_status(status, ref, exit_code)
                ):
                    return
        try:
            frame = decode_server_object(obj)
        except RemoteProtocolError as exc:
            self._log.warning("ignoring malformed frame from the server: %s", exc)
            return
        conn = self._conn
        if self.state in _ENDED or conn is None:
            self._debug("ignoring %r: no session on this socket", frame)
            return
        if isinstance(frame, OutputFrame):
            self._output(frame.stream, frame.data, frame.seq)
        elif isinstance(frame, StatusFrame):
            self._debug("status %s", frame.status)
            self._on_status(conn, frame)
        elif isinstance(frame, ErrorFrame):
            pending = conn.take_pending_error()
            if pending is None:
                self._log.info("server error with no status to attach it to: %s", frame.message)
            else:
                self._resolve_error(conn, pending, frame.message)
        elif isinstance(frame, SandboxIdFrame):
            self._on_sandbox_id(frame)
        elif isinstance(frame, StdinAckFrame):
            self._on_stdin_ack(conn, frame.seq)
        elif isinstance(frame, OutputGapFrame):
            if self._process is not None:
                self._emit(OutputIncomplete(self._process.exec_id))
        elif isinstance(frame, UnknownFrame):
            self._debug("ignoring unknown event %r", frame.event)

    def _exec_status(self, status: Status, ref: str | None, exit_code: int | None) -> bool:
        """A fast path's status frame, as :meth:`receive` would handle it; ``False``: left to it."""
        conn = self._conn
        state = self.state
        if conn is None or (state is not _RUNNING and state in _ENDED):
            return False  # the full path logs why it is ignored
        if self._log.isEnabledFor(logging.DEBUG):
            self._debug("status %s", status)
        self._on_process_status(conn, status, ref, exit_code)
        return True

    def _on_sandbox_id(self, frame: SandboxIdFrame) -> None:
        if self.state is not SandboxState.CREATING or self.sandbox_id is not None:
            self._log.warning("ignoring unexpected sandbox_id frame in state %s", self.state.value)
            return
        self.sandbox_id = frame.sandbox_id
        self.sandbox_token = frame.sandbox_token

    def _output(self, stream: Stream, data: str, seq: int | None) -> None:
        if seq is not None and EXT_SEQ in self.extensions:
            if seq <= self._last_seq:
                return  # replayed twice: already delivered
            self._last_seq = seq
        proc = self._process
        if proc is None or proc.state is _P_STARTING or proc.state is _P_DONE:
            self._debug("dropping %s output with no running process", stream)
            return
        self._events.append(Output(proc.exec_id, stream, data))

    def _on_stdin_ack(self, conn: Connection, seq: int) -> None:
        proc = self._process
        if proc is None or not proc.active or EXT_STDIN_SEQ not in self.extensions:
            return
        proc.acknowledge(seq)
        if conn.awaiting_stdin_ack:
            # The reconnect reply: what the server lacks goes again, once, before anything newer.
            conn.awaiting_stdin_ack = False
            proc.resend_unacknowledged()
            self._flush_stdin(proc)

    def _on_status(self, conn: Connection, frame: StatusFrame) -> None:
        status = frame.status
        if not isinstance(status, Status):
            self._log.info("ignoring unknown status %r", status)
            return
        if status in FATAL_STATUSES:
            self._reconnectable = False
        if status in _PROCESS_STATUSES:
            self._on_process_status(conn, status, frame.ref, frame.exit_code)
            return
        handler = _SANDBOX_HANDLERS.get(status)
        if handler is not None:
            handler(self, conn, status)
        elif status in ERROR_FRAME_STATUSES:
            conn.expect_error_frame(status, "log")
        elif status is Status.SANDBOX_RUNNING:
            self._on_running(conn, frame)

    # -- setup and reattach

    def _on_running(self, conn: Connection, frame: StatusFrame) -> None:
        if conn.running:
            self._debug("ignoring a second SANDBOX_RUNNING")
            return
        if self.state not in _SETUP and self.state is not SandboxState.RECONNECTING:
            self._debug("ignoring SANDBOX_RUNNING in state %s", self.state.value)
            return
        if self.sandbox_id is None:
            err = SandboxCreationError("the server reported SANDBOX_RUNNING without a sandbox id")
            self.state = SandboxState.FAILED
            self._emit(SetupFailed(err))
            self._emit(CloseConnection(1000))
            self._end(err)
            return
        conn.running = True
        # Only what was asked for: a server granting more is not trusted to mean what we would.
        self.extensions = _extension_set(frame.extensions, self._requested)
        self.state = SandboxState.RUNNING
        self._reconnectable = True
        self._lost_at = None
        self._reconnect_attempt = 0
        if conn.reattach:
            self._reattached(conn)
        else:
            self._emit(SetupComplete(self.sandbox_id, conn.restored))

    def _reattached(self, conn: Connection) -> None:
        """Running again on a new socket: send what is owed, in order (7.12)."""
        restored = conn.restored
        if self._kill_sandbox is Wire.HELD:
            self._hand_kill_sandbox()
            self._emit(Reconnected(restored))
            return
        proc = self._process
        if proc is not None and proc.active:
            if restored:
                # 7.10: a restore means the process did not survive the move.
                gone = SandboxConnectionError("the sandbox was restored elsewhere; the process is gone")
                if proc.started:
                    self._finish(proc, ProcessEnded(proc.exec_id, None, gone))
                else:
                    self._finish(proc, ExecRejected(proc.exec_id, gone))
            elif proc.request is Wire.HELD:
                self._hand_exec(proc)
            elif not proc.started:
                self._resolve_unanswered_exec(conn, proc)
            else:
                self._resume(conn, proc)
        if self._snapshot is Wire.HELD:
            self._hand_snapshot()
        if self._checkpoint is Wire.HELD:
            self._hand_checkpoint()
        self._emit(Reconnected(restored))

    def _resume(self, conn: Connection, proc: Exec) -> None:
        """Ask for the running exec's stream again; stdin follows once the server says what it has."""
        seq = EXT_SEQ in self.extensions
        numbered = EXT_STDIN_SEQ in self.extensions
        self._send(ReconnectRequest(self._last_seq if seq else None, stdin_seq=numbered))
        if not seq:
            self._emit(OutputIncomplete(proc.exec_id))
        proc.unnumbered_handed = 0
        if numbered:
            conn.awaiting_stdin_ack = True
        else:
            if proc.unacked:
                # Numbered on the old socket, but this server cannot say what arrived.
                proc.unacked.clear()
                self._emit(StdinIncomplete(proc.exec_id))
            self._flush_stdin(proc)
        self._send_kill_if_owed(proc)

    def _resolve_unanswered_exec(self, conn: Connection, proc: Exec) -> None:
        """The exec request may have reached the server, but no reply did: never leave an orphan."""
        if EXT_EXEC_REF in self.extensions:
            # Our server answers a reconnect with the stream of the exec that runs, named by the
            # ref its request carried (so another client's exec is not taken for ours), else one DONE.
            conn.adopting = True
            self._send(ReconnectRequest(self._last_seq, stdin_seq=EXT_STDIN_SEQ in self.extensions))
            return
        # Upstream would kill the session on a reconnect with nothing running (7.12 b); a kill is safe.
        self._send(KillProcessRequest())
        conn.stray_force_killed = True
        conn.stray_done = True
        err = SandboxConnectionError("the connection was lost before the exec started; it was killed in case it had")
        self._finish(proc, ExecRejected(proc.exec_id, err))

    def _on_restoring(self, conn: Connection, status: Status) -> None:
        if self.state in _SETUP or (self.state is SandboxState.RECONNECTING and not conn.running):
            if self.state in _SETUP:
                self.state = SandboxState.RESTORING
            conn.restored = True

    def _on_setup_refused(self, conn: Connection, status: Status) -> None:
        in_setup = self.state in _SETUP or (self.state is SandboxState.RECONNECTING and not conn.running)
        if not in_setup:
            self._log.warning("ignoring %s outside setup", status)
            return
        if conn.reattach:
            if status is Status.SANDBOX_IN_USE:
                # Transient: the server has not yet noticed our old socket died (7.12).
                self._reconnectable = True
                return
            if status is Status.SANDBOX_NOT_FOUND and self._kill_sandbox is not Wire.NONE:
                # What we came back to kill is already gone.
                self._kill_sandbox = Wire.NONE
                self.state = SandboxState.KILLED
                self._emit(KillSandboxDone(None))
                self._end(None)
                self._emit(CloseConnection(1000))
                return
        if status in ERROR_FRAME_STATUSES:
            conn.expect_error_frame(status, "setup")
        else:
            self._fail_setup(conn, status, None)

    def _fail_setup(self, conn: Connection, status: Status, message: str | None) -> None:
        if self.state in _ENDED:
            return
        text = f"{status.value}: {message}" if message else status.value
        err = SandboxCreationError(text, status=status, server_message=message)
        self.state = SandboxState.FAILED
        if not conn.reattach:
            self._emit(SetupFailed(err))
        self._end(err)
        self._emit(CloseConnection(1000))

    # -- lifecycle statuses

    def _on_deleted(self, conn: Connection, status: Status) -> None:
        if self._checkpoint is not Wire.NONE or self._kill_sandbox is not Wire.NONE:
            return  # part of the sequence we asked for (7.6, 7.7)
        self._server_ended(self._leaving_reason or "the server deleted the sandbox (idle timeout or lost lock)")

    def _on_lock_release_requested(self, conn: Connection, status: Status) -> None:
        if self._checkpoint is not Wire.NONE:
            return
        if self._kill_sandbox is not Wire.NONE:
            # Not part of a kill (7.6): the handoff overtook it, and the sandbox will live on elsewhere.
            self._leaving_reason = "the sandbox was handed off to another instance before the kill"
            self._sandbox_survives = True
            return
        self._server_ended("the sandbox is being handed off to another connection", survives=True)

    def _on_lock_renewal_error(self, conn: Connection, status: Status) -> None:
        self._leaving_reason = "the server lost the sandbox's lock; it is being deleted"

    def _server_ended(self, reason: str, *, survives: bool = False) -> None:
        self._leaving_reason = reason
        self._sandbox_survives = self._sandbox_survives or survives
        self.state = SandboxState.FAILED
        self._end(SandboxDeletedError(reason))
        self._emit(CloseConnection(1000))

    def _on_killed(self, conn: Connection, status: Status) -> None:
        if self._kill_sandbox is not Wire.HANDED:
            return
        self._kill_sandbox = Wire.NONE
        self.state = SandboxState.KILLED
        err = None
        if status is Status.SANDBOX_KILL_ERROR:
            err = SandboxStateError("the server reported SANDBOX_KILL_ERROR", status=status)
        self._emit(KillSandboxDone(err))
        self._end(None)
        self._emit(CloseConnection(1000))

    def _on_checkpointed(self, conn: Connection, status: Status) -> None:
        if self._checkpoint is not Wire.HANDED:
            self._server_ended(self._leaving_reason or "the sandbox was checkpointed by the server", survives=True)
            return
        self._checkpoint = Wire.NONE
        self.state = SandboxState.CHECKPOINTED
        # Saved, not deleted: a kill still on its way did not happen.
        self._sandbox_survives = True
        self._leaving_reason = self._leaving_reason or "the sandbox was checkpointed"
        self._emit(CheckpointDone(None))
        self._end(None)
        self._emit(CloseConnection(1000))

    def _on_checkpoint_error(self, conn: Connection, status: Status) -> None:
        if self._checkpoint is Wire.HANDED:
            conn.expect_error_frame(status, "checkpoint")
        # Unrequested: a failed handoff checkpoint, no error frame follows (6.1).

    def _on_snapshot_created(self, conn: Connection, status: Status) -> None:
        if self._snapshot is Wire.HANDED:
            self._snapshot = Wire.NONE
            self._emit(SnapshotDone(None))

    def _on_snapshot_error(self, conn: Connection, status: Status) -> None:
        conn.expect_error_frame(status, "snapshot" if self._snapshot is Wire.HANDED else "log")

    def _on_sandbox_error(self, conn: Connection, status: Status) -> None:
        conn.expect_error_frame(Status.SANDBOX_ERROR, "snapshot" if self._snapshot is Wire.HANDED else "log")

    # -- the active process

    def _on_process_status(self, conn: Connection, status: Status, ref: str | None, exit_code: int | None) -> None:
        """``ref`` and ``exit_code``: the frame's extension fields (see :class:`StatusFrame`)."""
        proc = self._process
        if proc is None or proc.state is _P_DONE:
            if status in ERROR_FRAME_STATUSES:
                conn.expect_error_frame(status, "log")
            if not conn.consume_stray(status):
                self._debug("ignoring %s with no active process", status)
            return
        if proc.state is _P_STARTING:
            if status is _EXEC_RUNNING and conn.adopting and ref != proc.ref:
                # The stream of another exec (another client's, or one we gave up on): had our
                # request arrived while it ran, it would have been refused.
                conn.adopting = False
                err = SandboxConnectionError("the connection was lost before the exec started; it did not run")
                self._finish(proc, ExecRejected(proc.exec_id, err))
            elif status is _EXEC_RUNNING:
                self._started(conn, proc)
            elif status in (Status.SANDBOX_EXECUTION_ERROR, Status.SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR):
                conn.expect_error_frame(status, "exec")
            elif status is _EXEC_DONE and conn.adopting:
                conn.adopting = False
                # One DONE cannot say which exec it ends: this one may have run and ended unseen.
                err = SandboxConnectionError(
                    "the connection was lost before the exec's start was seen; it is not running (it may have run)"
                )
                self._finish(proc, ExecRejected(proc.exec_id, err))
            else:
                # A DONE or FORCE_KILLED before our first status belongs to an earlier exec.
                self._debug("ignoring %s before the exec started", status)
            return
        if status is _EXEC_DONE:
            if proc.kill is _W_HANDED and not proc.force_killed_seen:
                conn.stray_force_killed = True
            # 15: use an extension only when granted on this connection.
            if EXT_EXIT_CODE not in self.extensions:
                exit_code = None
            self._finish(proc, ProcessEnded(proc.exec_id, exit_code, None))
        elif status is Status.SANDBOX_EXECUTION_FORCE_KILLED:
            proc.force_killed_seen = True
            proc.state = _P_KILLING
        elif status is Status.SANDBOX_EXECUTION_FORCE_KILL_ERROR:
            if proc.kill is _W_HANDED:
                proc.kill = _W_NONE
                proc.state = _P_RUNNING
                failure = SandboxExecutionError("the server could not kill the process", status=status)
                self._emit(KillProcessFailed(proc.exec_id, failure))
        elif status is _EXEC_RUNNING:
            pass  # the duplicate that starts a reconnect reply (7.12)
        elif status in ERROR_FRAME_STATUSES:
            # STDIN_ERROR, or an EXECUTION_ERROR about a request we did not make.
            conn.expect_error_frame(status, "log")

    def _started(self, conn: Connection, proc: Exec) -> None:
        proc.state = _P_RUNNING
        conn.adopting = False
        conn.stray_done = conn.stray_force_killed = False
        self._events.append(ExecStarted(proc.exec_id))
        # Guarded here, not only inside: most execs have neither, and this runs for each.
        if proc.pending:
            self._flush_stdin(proc)
        if proc.kill is _W_HELD:
            self._send_kill_if_owed(proc)

    def _finish(self, proc: Exec, event: ProcessEnded | ExecRejected) -> None:
        if proc.state is _P_DONE:
            return
        proc.state = _P_DONE
        if proc.pending or proc.unacked:
            proc.drop_stdin()
        self._events.append(event)
        if proc is self._process and self._queued_exec is not None:
            # The abandoned exec is over: the one waiting behind it goes now.
            queued, self._queued_exec = self._queued_exec, None
            self._process = queued
            if self.state is _RUNNING:
                self._hand_exec(queued)

    # -- error frames

    def _resolve_error(self, conn: Connection, pending: PendingError, message: str | None) -> None:
        status = pending.status
        text = f"{status.value}: {message}" if message else status.value
        if pending.kind == "setup":
            if self.state in _SETUP or (self.state is SandboxState.RECONNECTING and not conn.running):
                self._fail_setup(conn, status, message)
            else:  # the server went on to SANDBOX_RUNNING anyway: the refusal did not stand
                self._log.warning("server reported %s, then ran the sandbox", text)
        elif pending.kind == "exec":
            proc = self._process
            if proc is not None and proc.state is ProcessState.STARTING:
                # A DONE follows only if nothing else was running (7.3.5).
                conn.stray_done = True
                err = SandboxExecutionError(text, status=status, server_message=message)
                self._finish(proc, ExecRejected(proc.exec_id, err))
        elif pending.kind == "checkpoint":
            self._checkpoint = Wire.NONE
            if status is Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR and self.state is SandboxState.CHECKPOINTING:
                self.state = SandboxState.RUNNING
            self._emit(CheckpointDone(SandboxCheckpointError(text, status=status, server_message=message)))
        elif pending.kind == "snapshot":
            self._snapshot = Wire.NONE
            self._emit(SnapshotDone(SandboxFilesystemSnapshotError(text, status=status, server_message=message)))
        else:
            self._log.warning("server reported %s", text)

    # ------------------------------------------------------------------
    # user actions: each asks CALL_TABLE first

    def _verdict(self, call: Call) -> Verdict:
        verdict = CALL_TABLE[self.state][call]
        if verdict is _V_REFUSE:
            raise LocalProtocolError(self._refusal(call))
        return verdict

    def _refusal(self, call: Call) -> str:
        if self.state in _ENDED:
            return f"cannot {call.value}: the sandbox is {self.state.value}"
        if self.state is SandboxState.CHECKPOINTING:
            return f"cannot {call.value} while a checkpoint is in progress"
        return f"cannot {call.value}: the sandbox is {self.state.value}, not running yet"

    def _active(self, exec_id: int) -> Exec:
        proc = self._process
        if proc is None or proc.exec_id != exec_id or not proc.active:
            raise LocalProtocolError("the process has finished")
        return proc

    def exec(self, language: str, code: str) -> int:
        """Start an exec; returns its id. Held while reconnecting, or behind an abandoned exec."""
        verdict = self._verdict(_C_EXEC)
        # The 16 hex digits of f"{bits:016x}", at half the cost of formatting an int.
        proc = Exec(self._next_exec_id, language, code, self._rng.getrandbits(64).to_bytes(8, "big").hex())
        active = self._process
        if active is not None and active.state is not _P_DONE:
            if not active.abandoned or self._queued_exec is not None:
                raise LocalProtocolError(
                    "another process is still running in this sandbox; wait for it or kill it first"
                )
            self._queued_exec = proc
        else:
            self._process = proc
            if verdict is _V_SEND:
                self._hand_exec(proc)
        self._next_exec_id += 1
        return proc.exec_id

    def _hand_exec(self, proc: Exec) -> None:
        proc.request = _W_HANDED
        ref = proc.ref if EXT_EXEC_REF in self.extensions else None
        if self._log.isEnabledFor(logging.DEBUG):
            self._debug("send %r", ExecRequest(proc.language, proc.code, ref))
        # _send without its frame object and type dispatch: this is the one frame of every exec.
        self._outgoing.append(encode_exec_request(proc.language, proc.code, ref))
        self._outgoing_meta.append(("exec", proc, None))

    def abandon_exec(self, exec_id: int) -> None:
        """The caller stopped waiting for the exec to start: kill it once it starts, keep the sandbox."""
        queued = self._queued_exec
        if queued is not None and queued.exec_id == exec_id:
            self._queued_exec = None
            return
        proc = self._process
        if proc is None or proc.exec_id != exec_id or not proc.active:
            return
        if proc.request is Wire.HELD and not proc.started:
            # Never sent: nothing runs on the server.
            self._finish(proc, ExecRejected(exec_id, SandboxStateError("the exec was abandoned before it was sent")))
            return
        proc.abandoned = True
        self.kill_process(exec_id)

    def write_stdin(self, exec_id: int, data: str) -> None:
        """Send stdin, in order, exactly once where the server numbers it (``stdin_seq``)."""
        self._verdict(Call.STDIN)
        proc = self._active(exec_id)
        if proc.stdin_closed:
            raise LocalProtocolError("stdin of this process is closed")
        proc.add_stdin(data)
        self._flush_stdin(proc)

    def close_stdin(self, exec_id: int) -> None:
        """Extension ``close_stdin``: end of input, after everything written before it."""
        self._verdict(Call.CLOSE_STDIN)
        proc = self._active(exec_id)
        if EXT_CLOSE_STDIN not in self.extensions:
            raise LocalProtocolError("this server cannot close stdin (no close_stdin extension)")
        if not proc.stdin_closed:
            proc.add_stdin(None)
            self._flush_stdin(proc)

    def _flush_stdin(self, proc: Exec) -> None:
        conn = self._conn
        if (
            self.state not in _CONNECTED
            or conn is None
            or conn.awaiting_stdin_ack
            or not proc.started
            or proc is not self._process
        ):
            return
        numbered = EXT_STDIN_SEQ in self.extensions
        for item in proc.take_stdin(numbered):
            seq = item.seq if numbered else None
            if item.data is None:
                if EXT_CLOSE_STDIN in self.extensions:
                    self._send(CloseStdinRequest(seq), ("stdin", proc, item))
                else:
                    self._log.warning("stdin was not closed: this server has no close_stdin extension")
            else:
                self._send(StdinRequest(item.data, seq), ("stdin", proc, item))

    def kill_process(self, exec_id: int) -> None:
        """Ask for the process to be killed: once it has started (7.5), once a socket is up."""
        proc = self._process
        if proc is None or proc.exec_id != exec_id or not proc.active:
            return  # already over: nothing to kill
        if self._verdict(Call.KILL_PROCESS) is Verdict.IGNORE:
            return
        if proc.kill is Wire.NONE:
            proc.kill = Wire.HELD
        self._send_kill_if_owed(proc)

    def _send_kill_if_owed(self, proc: Exec) -> None:
        conn = self._conn
        if proc.kill is _W_HELD and proc.started and self.state in _CONNECTED and conn is not None:
            proc.kill = _W_HANDED
            self._send(KillProcessRequest(), ("kill", proc, None))

    def kill_process_timed_out(self, exec_id: int) -> bool:
        """The adapter gave up waiting for the kill. ``True``: the process is over for us.

        A kill that was sent is taken as done (upstream does the same after 5 s).
        A kill that could not be sent yet (reconnecting, not started) stays owed
        and is sent when possible: ``False``, the process is still running.
        """
        proc = self._process
        if proc is None or proc.exec_id != exec_id or not proc.active:
            return True
        if proc.kill is not Wire.HANDED:
            return False
        conn = self._conn
        if conn is not None:
            conn.stray_done = True
            conn.stray_force_killed = not proc.force_killed_seen
        self._finish(proc, ProcessEnded(exec_id, None, None))
        return True

    def kill_sandbox(self) -> None:
        verdict = self._verdict(Call.KILL_SANDBOX)
        if verdict is Verdict.IGNORE or self._kill_sandbox is not Wire.NONE:
            return
        if verdict is Verdict.END:
            self.close()  # not open yet: nothing on the server to kill from here
        elif verdict is Verdict.SEND:
            self._hand_kill_sandbox()
        else:
            self._kill_sandbox = Wire.HELD

    def _hand_kill_sandbox(self) -> None:
        self._kill_sandbox = Wire.HANDED
        self._send(KillSandboxRequest(), ("kill_sandbox", None, None))

    def kill_sandbox_timed_out(self) -> None:
        """The adapter gave up waiting for the kill: end the session, saying if the kill never left."""
        if self.state in _ENDED or self._kill_sandbox is Wire.NONE:
            return  # the kill already completed (or was never asked for): a late timer is a no-op
        if self._kill_sandbox is Wire.HANDED:
            self._kill_sandbox = Wire.NONE
            self.state = SandboxState.KILLED
            self._emit(KillSandboxDone(None))
            self._end(None)
        else:
            self._fail(SandboxConnectionError("no connection to the server within the timeout"))
        self._emit(CloseConnection(1000, abort=True))

    def checkpoint(self) -> None:
        verdict = self._verdict(Call.CHECKPOINT)
        if self._checkpoint is not Wire.NONE:
            raise LocalProtocolError("a checkpoint is already in progress")
        if verdict is Verdict.SEND:
            self._hand_checkpoint()
        else:
            self._checkpoint = Wire.HELD

    def _hand_checkpoint(self) -> None:
        self._checkpoint = Wire.HANDED
        self.state = SandboxState.CHECKPOINTING
        self._send(CheckpointRequest(), ("checkpoint", None, None))

    def checkpoint_timed_out(self) -> None:
        """A checkpoint still held is dropped; one sent leaves the session untrustworthy."""
        if self._checkpoint is Wire.HELD:
            self._checkpoint = Wire.NONE
        elif self._checkpoint is Wire.HANDED:
            self.operation_timed_out("checkpoint")

    def snapshot_filesystem(self, name: str) -> None:
        verdict = self._verdict(Call.SNAPSHOT)
        if self._snapshot is not Wire.NONE:
            raise LocalProtocolError("a snapshot is already in progress")
        self._snapshot_name = name
        if verdict is Verdict.SEND:
            self._hand_snapshot()
        else:
            self._snapshot = Wire.HELD

    def _hand_snapshot(self) -> None:
        self._snapshot = Wire.HANDED
        self._send(SnapshotRequest(self._snapshot_name), ("snapshot", None, None))

    def snapshot_timed_out(self) -> None:
        """The caller gave up: a held snapshot is never sent, a late reply is ignored."""
        self._snapshot = Wire.NONE

    def operation_timed_out(self, what: str) -> None:
        """A setup or checkpoint wait timed out: the session cannot be trusted any more."""
        if self.state in _ENDED:
            return
        self._checkpoint = Wire.NONE
        self.state = SandboxState.FAILED
        self._end(SandboxConnectionError(f"{what} timed out"))
        self._emit(CloseConnection(1000, abort=True))

    def close(self) -> None:
        """Detach: end the session locally and leave the sandbox running on the server."""
        if self._verdict(Call.CLOSE) is Verdict.IGNORE:
            return
        self.state = SandboxState.CLOSED
        self._end(SandboxStateError("the sandbox connection was closed"))
        self._emit(CloseConnection(1000))

    # ------------------------------------------------------------------

    def _fail(self, error: SandboxException) -> None:
        self.state = SandboxState.FAILED
        self._end(error)

    def _end(self, error: SandboxException | None) -> None:
        """Wake every waiter: nothing further will happen on this session."""
        if self._session_ended:
            return
        self._session_ended = True
        self._reconnectable = False
        if self._conn is not None:
            self._conn.pending_errors.clear()
        cause = error or SandboxStateError(f"the sandbox is {self.state.value}")
        queued, self._queued_exec = self._queued_exec, None
        if queued is not None:
            self._emit(ExecRejected(queued.exec_id, cause))
        proc = self._process
        if proc is not None and proc.active:
            if proc.started:
                self._finish(proc, ProcessEnded(proc.exec_id, None, error))
            else:
                self._finish(proc, ExecRejected(proc.exec_id, cause))
        if self._checkpoint is not Wire.NONE:
            self._checkpoint = Wire.NONE
            self._emit(CheckpointDone(SandboxCheckpointError(f"checkpoint did not complete: {cause}")))
        if self._snapshot is not Wire.NONE:
            self._snapshot = Wire.NONE
            self._emit(SnapshotDone(SandboxFilesystemSnapshotError(f"snapshot did not complete: {cause}")))
        if self._kill_sandbox is not Wire.NONE:
            why: SandboxException | None = None
            if self._kill_sandbox is Wire.HELD:
                why = SandboxConnectionError(f"the sandbox was not killed: {cause}")
            elif self._sandbox_survives:
                why = SandboxStateError(f"the sandbox was not killed: {self._leaving_reason}")
            self._kill_sandbox = Wire.NONE
            self._emit(KillSandboxDone(why))
        self._emit(SessionEnded(error))


_SANDBOX_HANDLERS = {
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
