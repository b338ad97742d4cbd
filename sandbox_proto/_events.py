"""What the client core tells its adapter: one class per thing to wake or do."""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import SandboxException
from ._frames import Stream


@dataclass(frozen=True, slots=True)
class SetupComplete:
    """Create or attach succeeded: the sandbox is ``RUNNING`` on this connection."""

    sandbox_id: str
    restored: bool


@dataclass(frozen=True, slots=True)
class SetupFailed:
    error: SandboxException


# Not frozen: one per exec, and frozen ones cost 3x to make (as Output). Read-only; hashable as before.
@dataclass(slots=True, unsafe_hash=True)
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
class StdinIncomplete:
    """Stdin of this exec may not all have reached the process (a drop, no ``stdin_seq``)."""

    exec_id: int


@dataclass(slots=True, unsafe_hash=True)  # as ExecStarted: one per exec
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
    #: Why the sandbox may still exist (``SANDBOX_KILL_ERROR``, or the kill never reached the server).
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
    | StdinIncomplete
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
