"""The server role: classify client frames and write the server's replies, with no I/O.

The reference server drives one :class:`ServerProtocol` per WebSocket. This
object owns the wire rules that do not depend on what a sandbox is: the
dispatch precedence of protocol.md 3.1, request validation with upstream's
exact texts, the DONE-iff-idle rule after a refused exec (7.3.5), extension
fields (15), the setup sequence, what a malformed frame gets (11.2 S6), the
order of the attach checks (7.2, S3, S4), the reply to ``reconnect`` (7.12,
S1) and the stdin sequence rules of the ``stdin_seq`` extension.
What a sandbox *does* (processes, files, checkpoints) belongs to the server:
it gathers facts (:class:`AttachFacts`, :class:`ExecutionView`), asks the
decision methods, and acts on what they return.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._errors import RemoteProtocolError
from ._frames import (
    ErrorFrame,
    OutputFrame,
    OutputGapFrame,
    SandboxIdFrame,
    ServerFrame,
    StatusFrame,
    StdinAckFrame,
    Stream,
    encode_server_frame,
    load_object,
)
from ._status import Status

SUPPORTED_LANGUAGES = ("python", "bash")
EXT_EXEC_REF = "exec_ref"
ALL_EXTENSIONS = ("exit_code", "seq", "close_stdin", "stdin_seq", EXT_EXEC_REF)
#: Longest exec name (``exec_ref``) the server keeps.
MAX_EXEC_REF = 64
#: Extension ``stdin_seq``: acknowledge after this many numbered stdin frames...
STDIN_ACK_FRAMES = 16
#: ...or this many bytes of their data, so that what a client keeps for a resend stays bounded.
STDIN_ACK_BYTES = 256 * 1024
#: Largest sequence number (stdin ``seq``, ``last_seq``) accepted: every JSON reader, JavaScript's
#: included, represents integers up to 2**53 - 1 exactly (RFC 7493, I-JSON).
MAX_SEQ = 2**53 - 1

MSG_INVALID_FORMAT = (
    "Invalid message format. 'language' and 'code' fields are required. Supported languages are: python, bash"
)
MSG_INVALID_STDIN = "Invalid stdin message format. 'data' field is required."
MSG_INVALID_STDIN_SEQ = "Invalid stdin message format. 'seq' must be a positive integer."
MSG_NO_PROCESS = "No process is running in the sandbox."
MSG_ALREADY_RUNNING = "An execution is already in progress."
MSG_TOKEN_MISSING = "Sandbox token is missing."
MSG_TOKEN_INVALID = "Invalid sandbox token."
MSG_CHECKPOINT_DISABLED = "Checkpointing is not enabled on the server."
MSG_SNAPSHOT_DISABLED = "Filesystem snapshot is not enabled on the server."
MSG_HANDOFF_NEEDS_CHECKPOINT = "Sandbox handoff requires checkpointing to be enabled."
MSG_AUTO_CHECKPOINT_NEEDS_CHECKPOINT = "Idle timeout auto checkpoint requires checkpointing to be enabled."
MSG_CHECKPOINT_IN_PROGRESS = "Cannot checkpoint while an execution is in progress."

_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


#: How much of an unsupported ``language`` value its error message quotes.
_QUOTED_LANGUAGE = 100


def unsupported_language_message(language: object) -> str:
    quoted = str(language)
    if len(quoted) > _QUOTED_LANGUAGE:
        # Upstream quotes it whole; a 16 MiB value would make an error message four times its size.
        quoted = quoted[:_QUOTED_LANGUAGE] + "..."
    return f"Unsupported language: '{quoted}'. Supported languages are: python, bash"


def finite_number(value: object) -> bool:
    """A JSON number usable as a float: not a boolean, not NaN or +-Infinity, no integer beyond float range.

    ``json`` reads ``NaN``/``Infinity`` literals and integers of any size (10**400 overflows ``float()``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large to convert
        return False


def valid_seq(value: object, minimum: int) -> bool:
    """An integer sequence number from ``minimum`` to :data:`MAX_SEQ` (not a bool, not a float like 1.0)."""
    return type(value) is int and minimum <= value <= MAX_SEQ


def valid_snapshot_name(name: object) -> bool:
    """Names usable as one path component: ``[A-Za-z0-9._-]{1,128}``, not starting with ``.`` (S7)."""
    return isinstance(name, str) and _SNAPSHOT_NAME.fullmatch(name) is not None


class Close(int):
    """An item of :meth:`ServerProtocol.data_to_send` that means: close with this code."""


# --------------------------------------------------------------------------
# requests the server must act on


@dataclass(frozen=True, slots=True)
class CreateOptions:
    """A validated init message (3.2)."""

    idle_timeout: float | None
    enable_checkpoint: bool
    enable_idle_timeout_auto_checkpoint: bool
    enable_sandbox_handoff: bool
    filesystem_snapshot_name: str | None


@dataclass(frozen=True, slots=True)
class ExecRequested:
    language: str
    code: str
    #: Extension ``exec_ref``: the client's name for this exec, echoed on its ``SANDBOX_EXECUTION_RUNNING``.
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class StdinReceived:
    data: str
    #: Extension ``stdin_seq``: the frame's number, ``None`` for an unnumbered frame.
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class KillProcessRequested:
    pass


@dataclass(frozen=True, slots=True)
class KillSandboxRequested:
    pass


@dataclass(frozen=True, slots=True)
class CheckpointRequested:
    pass


@dataclass(frozen=True, slots=True)
class SnapshotRequested:
    #: The raw ``name`` value: the server checks storage before validating it (7.8).
    name: object


@dataclass(frozen=True, slots=True)
class ReconnectRequested:
    last_seq: int | None
    #: Extension ``stdin_seq``: the client asked for a ``stdin_ack`` first.
    stdin_seq: bool = False


@dataclass(frozen=True, slots=True)
class CloseStdinRequested:
    #: Extension ``stdin_seq``: numbered in the same sequence as stdin frames.
    seq: int | None = None


Request = (
    CreateOptions
    | ExecRequested
    | StdinReceived
    | KillProcessRequested
    | KillSandboxRequested
    | CheckpointRequested
    | SnapshotRequested
    | ReconnectRequested
    | CloseStdinRequested
)


class ProcessPhase(enum.Enum):
    """What the connection's sandbox holds, as far as stdin and reconnect care (7.4)."""

    NONE = "none"  # nothing since create/restore, or the last exec was killed
    RUNNING = "running"
    EXITED = "exited"


# --------------------------------------------------------------------------
# facts the server gathers, and the decisions taken on them


class RestoreResult(enum.Enum):
    """How restoring a sandbox that is not live on this instance ended (7.2)."""

    RESTORED = "restored"  # live now (restored here, or by a concurrent attach)
    NOT_FOUND = "not_found"  # no metadata under that id
    PERMISSION_DENIED = "permission_denied"  # the persisted token hash does not match (S4)
    FAILED = "failed"  # see AttachFacts.restore_error


@dataclass(frozen=True, slots=True)
class AttachFacts:
    """What the server knows about an ``/attach`` request, for :meth:`ServerProtocol.answer_attach`."""

    sandbox_id: str
    #: The query carried a non-empty ``sandbox_token``.
    token_present: bool
    #: The sandbox is live on this instance (after the restore, when one ran).
    found: bool = False
    #: How the restore ended; ``None`` while none was attempted.
    restore: RestoreResult | None = None
    #: With :attr:`RestoreResult.FAILED`: the reason, shown after ``Failed to restore sandbox <ID>: ``.
    restore_error: str = ""
    #: The token matches the sandbox's.
    token_ok: bool = False
    #: Another connection is attached to the sandbox.
    observed: bool = False
    #: The sandbox's process, as stdin and exec requests will see it once attached.
    phase: ProcessPhase = ProcessPhase.NONE


class AttachStep(enum.Enum):
    """What the server does after :meth:`ServerProtocol.answer_attach` queued its frames."""

    REFUSED = "refused"  # the refusal (and its close) is queued: send it, nothing more
    RESTORE = "restore"  # SANDBOX_RESTORING is queued: restore, then ask again with the outcome
    ATTACHED = "attached"  # SANDBOX_RUNNING is queued: this connection now observes the sandbox


@dataclass(frozen=True, slots=True)
class ExecutionView:
    """The sandbox's current (or most recent) exec, as a ``reconnect`` reply needs it."""

    running: bool
    #: A connection has sent this exec's ``SANDBOX_EXECUTION_DONE``.
    done_delivered: bool
    #: Output seq of the exec's first frame; ``last_seq`` is ``first_seq - 1`` while it has none.
    first_seq: int
    last_seq: int
    #: Highest output seq of the sandbox handed to any connection.
    delivered: int
    #: Highest stdin seq accepted for this exec (extension ``stdin_seq``), 0 if none.
    stdin_seq: int = 0
    exit_code: int | None = None
    #: The sandbox is deleted: its exec is over, whatever its output log still holds.
    sandbox_deleted: bool = False
    #: The client's name for the exec (extension ``exec_ref``).
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class ResumeStream:
    """The ``reconnect`` reply goes on: stream the exec's output frames with ``seq > cursor``, then its DONE."""

    cursor: int
    #: Announce frames evicted before they could be replayed with ``output_gap`` (the client sent ``last_seq``).
    report_gaps: bool


@dataclass(frozen=True, slots=True)
class ReconnectDone:
    """The ``reconnect`` reply is complete: one ``SANDBOX_EXECUTION_DONE`` is queued."""

    #: That DONE ended the current exec: record it as delivered, so it is not repeated with the exit code.
    done_delivered: bool


class ServerProtocol:
    """One WebSocket of the reference server."""

    def __init__(
        self,
        *,
        create: bool,
        extensions: tuple[str, ...] = ALL_EXTENSIONS,
        requested: Iterable[str] | None = ALL_EXTENSIONS,
        checkpoint_enabled: bool = True,
        snapshots_enabled: bool = True,
    ) -> None:
        """``extensions``: what the server supports; ``requested``: what the client asked for.

        ``requested`` is what the handshake's ``extensions`` parameter names
        (:func:`requested_extensions`), ``None`` when it asks for none; the
        default, all of them, is for tests of this role alone. The connection
        uses the extensions in both; ``SANDBOX_RUNNING`` lists them (sorted, an
        empty list when none matched) when the client asked for any and the
        server supports any, so that a client that asked for nothing, or a
        server in upstream mode, gets exactly the upstream frames.
        """
        self.is_create = create
        self.extensions = frozenset(extensions) & frozenset(requested) if requested is not None else frozenset()
        self._announce = requested is not None and bool(extensions)
        self.checkpoint_enabled = checkpoint_enabled
        self.snapshots_enabled = snapshots_enabled
        self.setup_done = False
        self.closed = False
        #: Set by the server once known; used in error texts.
        self.sandbox_id = ""
        self.process = ProcessPhase.NONE
        self._out: list[str | Close] = []
        # Numbered stdin accepted since the last stdin_ack on this connection.
        self._unacked_frames = 0
        self._unacked_bytes = 0

    # ------------------------------------------------------------------
    # outputs

    def data_to_send(self) -> list[str | Close]:
        out, self._out = self._out, []
        return out

    def send(self, frame: ServerFrame) -> None:
        if not self.closed:
            self._out.append(encode_server_frame(frame))

    def send_status(self, status: Status) -> None:
        self.send(StatusFrame(status))

    def send_error(self, status: Status, message: str, *, close: int | None = None) -> None:
        """The error pair of 6.1, optionally followed by a close."""
        self.send(StatusFrame(status))
        self.send(ErrorFrame(message))
        if close is not None:
            self.close(close)

    def close(self, code: int) -> None:
        if not self.closed:
            self._out.append(Close(code))
            self.closed = True

    # ------------------------------------------------------------------
    # setup

    def send_sandbox_id(self, sandbox_id: str, token: str) -> None:
        self.sandbox_id = sandbox_id
        self.send(SandboxIdFrame(sandbox_id, token))

    def send_running(self) -> None:
        """``SANDBOX_RUNNING``, listing the extensions granted (15) when the client asked; setup is over."""
        self.setup_done = True
        self.send(StatusFrame(Status.SANDBOX_RUNNING, tuple(sorted(self.extensions)) if self._announce else None))

    def fail_creation(self, message: str) -> None:
        self.send_error(Status.SANDBOX_CREATION_ERROR, message, close=4000)

    def receive_init(self, text: str | bytes) -> CreateOptions | None:
        """Handle the first frame on ``/create``; ``None`` when it was refused (frames queued)."""
        self.send_status(Status.SANDBOX_CREATING)
        try:
            obj = load_object(text)
        except RemoteProtocolError as exc:
            self.fail_creation(f"Invalid init message: {exc}")
            return None
        checkpoint = bool(obj.get("enable_checkpoint"))
        auto_checkpoint = bool(obj.get("enable_idle_timeout_auto_checkpoint"))
        handoff = bool(obj.get("enable_sandbox_handoff"))
        snapshot = obj.get("filesystem_snapshot_name")
        idle: Any = obj.get("idle_timeout", 300)
        # Upstream's order of checks (7.1), then our type checks (S7).
        if checkpoint and not self.checkpoint_enabled:
            message = MSG_CHECKPOINT_DISABLED
        elif snapshot and not self.snapshots_enabled:
            message = MSG_SNAPSHOT_DISABLED
        elif handoff and not checkpoint:
            message = MSG_HANDOFF_NEEDS_CHECKPOINT
        elif auto_checkpoint and not checkpoint:
            message = MSG_AUTO_CHECKPOINT_NEEDS_CHECKPOINT
        elif idle is not None and not finite_number(idle):
            message = "Invalid idle_timeout: it must be a number of seconds or null."
        elif snapshot and not valid_snapshot_name(snapshot):
            message = "Invalid filesystem snapshot name: use 1-128 of A-Z a-z 0-9 . _ - not starting with '.'."
        else:
            return CreateOptions(
                idle_timeout=float(idle) if idle else None,
                enable_checkpoint=checkpoint,
                enable_idle_timeout_auto_checkpoint=auto_checkpoint,
                enable_sandbox_handoff=handoff,
                filesystem_snapshot_name=snapshot or None,
            )
        self.fail_creation(message)
        return None

    # ------------------------------------------------------------------
    # after setup

    def receive(self, text: str | bytes) -> Request | None:
        """Classify one frame by the dispatch rule (3.1); ``None`` when answered already."""
        try:
            obj = load_object(text)
        except RemoteProtocolError as exc:
            self.send_error(Status.SANDBOX_ERROR, f"Malformed message: {exc}")
            return None
        action = obj.get("action")
        if action == "checkpoint":
            return CheckpointRequested()
        if action == "snapshot_filesystem":
            return SnapshotRequested(obj.get("name"))
        if action == "kill_process":
            return KillProcessRequested()
        if action == "kill_sandbox":
            return KillSandboxRequested()
        if obj.get("event") == "stdin":
            return self._stdin(obj)
        if action == "reconnect":
            last_seq = obj.get("last_seq") if "seq" in self.extensions else None
            # Any size is harmless here: it is only compared, never stored or echoed.
            if type(last_seq) is not int or last_seq < 0:
                last_seq = None
            return ReconnectRequested(last_seq, "stdin_seq" in self.extensions and obj.get("stdin_seq") is True)
        if action == "close_stdin" and "close_stdin" in self.extensions:
            valid, seq = self._stdin_seq(obj)
            return CloseStdinRequested(seq) if valid else None
        return self._exec(obj)

    def _stdin_seq(self, obj: dict[str, Any]) -> tuple[bool, int | None]:
        """The frame's stdin ``seq``: (True, None) when unnumbered or not negotiated; (False, None) refused."""
        if "stdin_seq" not in self.extensions or "seq" not in obj:
            return True, None  # upstream ignores unknown keys
        seq = obj["seq"]
        if not valid_seq(seq, 1):
            self.send_error(Status.SANDBOX_STDIN_ERROR, MSG_INVALID_STDIN_SEQ)
            return False, None
        return True, seq

    def _stdin(self, obj: dict[str, Any]) -> StdinReceived | None:
        if "data" not in obj:
            self.send_error(Status.SANDBOX_STDIN_ERROR, MSG_INVALID_STDIN)
            return None
        valid, seq = self._stdin_seq(obj)
        if not valid:
            return None
        if self.process is ProcessPhase.NONE:
            self.send_error(Status.SANDBOX_EXECUTION_ERROR, MSG_NO_PROCESS)
            return None
        if self.process is ProcessPhase.EXITED:
            return None  # silently discarded, as upstream (7.4)
        data = obj["data"]
        if not isinstance(data, str):
            self.send_error(Status.SANDBOX_ERROR, f"stdin 'data' must be a string, not {type(data).__name__}")
            return None
        return StdinReceived(data, seq)

    def _exec(self, obj: dict[str, Any]) -> ExecRequested | None:
        language = obj.get("language")
        if language not in SUPPORTED_LANGUAGES:
            self.reject_exec(
                Status.SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR, unsupported_language_message(language)
            )
            return None
        if "code" not in obj:
            self.reject_exec(Status.SANDBOX_EXECUTION_ERROR, MSG_INVALID_FORMAT)
            return None
        code = obj["code"]
        if not isinstance(code, str):
            # Upstream's unexpected-error path (7.3.6).
            self.send_error(Status.SANDBOX_ERROR, f"'code' must be a string, not {type(code).__name__}", close=4000)
            return None
        if self.process is ProcessPhase.RUNNING:
            self.reject_exec(Status.SANDBOX_EXECUTION_ERROR, MSG_ALREADY_RUNNING)
            return None
        assert isinstance(language, str)
        ref = obj.get("ref") if EXT_EXEC_REF in self.extensions else None
        if not isinstance(ref, str) or not 0 < len(ref) <= MAX_EXEC_REF:
            ref = None  # a malformed name only costs the client the disambiguation
        return ExecRequested(language, code, ref)

    def reject_exec(self, status: Status, message: str) -> None:
        """An exec-start error, then DONE if and only if nothing is running (7.3.5)."""
        self.send_error(status, message)
        if self.process is not ProcessPhase.RUNNING:
            self.send_status(Status.SANDBOX_EXECUTION_DONE)

    # ------------------------------------------------------------------
    # the process, as the server reports it

    def exec_started(self, ref: str | None = None) -> None:
        """``SANDBOX_EXECUTION_RUNNING``, naming the exec (``exec_ref``) where granted."""
        self.process = ProcessPhase.RUNNING
        self.send(StatusFrame(Status.SANDBOX_EXECUTION_RUNNING, ref=ref if EXT_EXEC_REF in self.extensions else None))

    def send_output(self, stream: Stream, data: str, seq: int | None = None) -> None:
        self.send(OutputFrame(stream, data, seq if "seq" in self.extensions else None))

    def send_output_gap(self, from_seq: int, to_seq: int) -> None:
        if "seq" in self.extensions:
            self.send(OutputGapFrame(from_seq, to_seq))

    def send_done(self, exit_code: int | None) -> None:
        """``SANDBOX_EXECUTION_DONE``, with the exit code where negotiated."""
        self.send(
            StatusFrame(Status.SANDBOX_EXECUTION_DONE, exit_code=exit_code if "exit_code" in self.extensions else None)
        )

    def exec_finished(self, exit_code: int | None, *, killed: bool = False) -> None:
        self.process = ProcessPhase.NONE if killed else ProcessPhase.EXITED
        self.send_done(exit_code)

    # ------------------------------------------------------------------
    # stdin sequence (extension stdin_seq)

    def is_new_stdin(self, request: StdinReceived | CloseStdinRequested, accepted: int) -> bool:
        """Whether to queue a stdin or close_stdin frame for the exec's process.

        ``accepted`` is the highest stdin seq the exec has accepted, over every
        connection. A numbered frame at or below it is a resend of one already
        queued (the client could not know it arrived): drop it, silently.
        """
        return request.seq is None or request.seq > accepted

    def stdin_accepted(self, request: StdinReceived | CloseStdinRequested) -> None:
        """The server queued this frame for the process: acknowledge now and then.

        After 16 numbered frames or 256 KiB of their data since the last ack on
        this connection, a ``stdin_ack`` bounds what the client keeps for a resend.
        """
        if request.seq is None:
            return
        self._unacked_frames += 1
        if isinstance(request, StdinReceived):
            self._unacked_bytes += len(request.data.encode("utf-8", "surrogatepass"))
        if self._unacked_frames >= STDIN_ACK_FRAMES or self._unacked_bytes >= STDIN_ACK_BYTES:
            self.send_stdin_ack(request.seq)

    def send_stdin_ack(self, seq: int) -> None:
        if "stdin_seq" in self.extensions:
            self._unacked_frames = self._unacked_bytes = 0
            self.send(StdinAckFrame(seq))

    # ------------------------------------------------------------------
    # attach and reconnect

    def answer_attach(self, facts: AttachFacts) -> AttachStep:
        """Answer an ``/attach``: upstream's order of checks (7.2), the channel moved only on success (S3).

        Call it with what the server knows without storage; on
        :attr:`AttachStep.RESTORE` restore the sandbox (the token hash is
        checked first, S4) and call again with the outcome in ``restore``.
        """
        if not facts.token_present:
            self.send_error(Status.SANDBOX_PERMISSION_DENIAL_ERROR, MSG_TOKEN_MISSING, close=4000)
            return AttachStep.REFUSED
        if not facts.found and facts.restore is None and self.checkpoint_enabled:
            self.send_status(Status.SANDBOX_RESTORING)  # before the metadata lookup, as upstream
            return AttachStep.RESTORE
        if facts.restore is RestoreResult.PERMISSION_DENIED:
            self.send_error(Status.SANDBOX_PERMISSION_DENIAL_ERROR, MSG_TOKEN_INVALID, close=4000)
            return AttachStep.REFUSED
        if facts.restore is RestoreResult.FAILED:
            message = f"Failed to restore sandbox {facts.sandbox_id}: {facts.restore_error}"
            self.send_error(Status.SANDBOX_RESTORE_ERROR, message, close=4000)
            return AttachStep.REFUSED
        if not facts.found:
            self.send_status(Status.SANDBOX_NOT_FOUND)  # no error frame, 1011: what upstream clients expect
            self.close(1011)
            return AttachStep.REFUSED
        if not facts.token_ok:
            self.send_error(Status.SANDBOX_PERMISSION_DENIAL_ERROR, MSG_TOKEN_INVALID, close=4000)
            return AttachStep.REFUSED
        if facts.observed:
            self.send_status(Status.SANDBOX_IN_USE)
            self.close(1011)
            return AttachStep.REFUSED
        self.sandbox_id = facts.sandbox_id
        self.process = facts.phase
        self.send_running()
        return AttachStep.ATTACHED

    def answer_reconnect(
        self, request: ReconnectRequested, execution: ExecutionView | None, *, streaming_cursor: int | None = None
    ) -> ResumeStream | ReconnectDone:
        """Reply to ``reconnect`` (7.12): resume the exec's stream (case a), else exactly one DONE (S1).

        ``execution`` is the sandbox's current or last exec (``None``: none
        since create/restore). ``streaming_cursor`` is the highest output seq
        this connection has queued, when it is streaming that exec already.
        With ``stdin_seq`` asked for, a ``stdin_ack`` comes first, so the client
        knows what to resend before anything else of the reply.
        """
        if request.stdin_seq:
            self.send_stdin_ack(0 if execution is None else execution.stdin_seq)
        if execution is None or execution.sandbox_deleted:
            self.send_done(None)
            return ReconnectDone(done_delivered=False)
        last_seq = request.last_seq
        if streaming_cursor is not None:
            resume = streaming_cursor if last_seq is None else min(last_seq, streaming_cursor)
            return self._resume(execution, resume, report_gaps=last_seq is not None)
        unsent = execution.delivered < execution.last_seq
        missed = last_seq is not None and last_seq < execution.last_seq
        if (not execution.done_delivered and (execution.running or unsent)) or missed:
            resume = execution.delivered if last_seq is None else min(last_seq, execution.delivered)
            return self._resume(execution, resume, report_gaps=last_seq is not None)
        exit_code = None
        if not execution.running and (not execution.done_delivered or last_seq is not None):
            exit_code = execution.exit_code
        self.send_done(exit_code)
        return ReconnectDone(done_delivered=True)

    def _resume(self, execution: ExecutionView, resume: int, *, report_gaps: bool) -> ResumeStream:
        # The duplicate RUNNING upstream clients expect; its ref says whose stream this is.
        self.exec_started(execution.ref)
        return ResumeStream(max(resume, execution.first_seq - 1), report_gaps)
