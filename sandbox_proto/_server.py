"""The server role: classify client frames and write the server's replies, with no I/O.

The reference server drives one :class:`ServerProtocol` per WebSocket. This
object owns the wire rules that do not depend on what a sandbox is: the
dispatch precedence of protocol.md 3.1, request validation with upstream's
exact texts, the DONE-iff-idle rule after a refused exec (7.3.5), extension
fields (15), the setup sequence, and what a malformed frame gets (11.2 S6).
What a sandbox *does* (processes, files, checkpoints) belongs to the server.
"""

from __future__ import annotations

import enum
import math
import re
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
    Stream,
    encode_server_frame,
    load_object,
)
from ._status import Status

SUPPORTED_LANGUAGES = ("python", "bash")
ALL_EXTENSIONS = ("exit_code", "seq", "close_stdin")

MSG_INVALID_FORMAT = (
    "Invalid message format. 'language' and 'code' fields are required. Supported languages are: python, bash"
)
MSG_INVALID_STDIN = "Invalid stdin message format. 'data' field is required."
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


def unsupported_language_message(language: object) -> str:
    return f"Unsupported language: '{language}'. Supported languages are: python, bash"


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


@dataclass(frozen=True, slots=True)
class StdinReceived:
    data: str


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


@dataclass(frozen=True, slots=True)
class CloseStdinRequested:
    pass


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


class ServerProtocol:
    """One WebSocket of the reference server."""

    def __init__(
        self,
        *,
        create: bool,
        extensions: tuple[str, ...] = ALL_EXTENSIONS,
        checkpoint_enabled: bool = True,
        snapshots_enabled: bool = True,
    ) -> None:
        self.is_create = create
        self.extensions = frozenset(extensions)
        self.checkpoint_enabled = checkpoint_enabled
        self.snapshots_enabled = snapshots_enabled
        self.setup_done = False
        self.closed = False
        #: Set by the server once known; used in error texts.
        self.sandbox_id = ""
        self.process = ProcessPhase.NONE
        self._out: list[str | Close] = []

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
        """``SANDBOX_RUNNING``, advertising our extensions (15); setup is over."""
        self.setup_done = True
        self.send(StatusFrame(Status.SANDBOX_RUNNING, tuple(sorted(self.extensions)) if self.extensions else None))

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
        elif idle is not None and (
            isinstance(idle, bool) or not isinstance(idle, int | float) or not math.isfinite(idle)
        ):
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
            if type(last_seq) is not int or last_seq < 0:
                last_seq = None
            return ReconnectRequested(last_seq)
        if action == "close_stdin" and "close_stdin" in self.extensions:
            return CloseStdinRequested()
        return self._exec(obj)

    def _stdin(self, obj: dict[str, Any]) -> StdinReceived | None:
        if "data" not in obj:
            self.send_error(Status.SANDBOX_STDIN_ERROR, MSG_INVALID_STDIN)
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
        return StdinReceived(data)

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
        return ExecRequested(language, code)

    def reject_exec(self, status: Status, message: str) -> None:
        """An exec-start error, then DONE if and only if nothing is running (7.3.5)."""
        self.send_error(status, message)
        if self.process is not ProcessPhase.RUNNING:
            self.send_status(Status.SANDBOX_EXECUTION_DONE)

    # ------------------------------------------------------------------
    # the process, as the server reports it

    def exec_started(self) -> None:
        self.process = ProcessPhase.RUNNING
        self.send_status(Status.SANDBOX_EXECUTION_RUNNING)

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
