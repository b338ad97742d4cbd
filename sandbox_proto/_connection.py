"""What the client knows about one WebSocket: made per socket, so a drop resets it by construction."""

from __future__ import annotations

from dataclasses import dataclass

from ._status import Status


@dataclass(slots=True)
class PendingError:
    """An error status waiting for its ``error`` frame (6.1)."""

    status: Status
    #: Whom the message is for: "setup", "exec", "checkpoint", "snapshot" or "log".
    kind: str


class Connection:
    """Per-socket state. Nothing in here outlives the socket it describes."""

    __slots__ = (
        "adopting",
        "awaiting_stdin_ack",
        "pending_errors",
        "reattach",
        "restored",
        "running",
        "stray_done",
        "stray_force_killed",
    )

    def __init__(self, *, reattach: bool) -> None:
        #: Opened by a reconnect: setup ends in a reattach, not in the first ``SetupComplete``.
        self.reattach = reattach
        #: ``SANDBOX_RUNNING`` seen on this socket.
        self.running = False
        #: ``SANDBOX_RESTORING`` seen during setup.
        self.restored = False
        self.pending_errors: list[PendingError] = []
        # Frames that may trail a process already finished on this socket (7.3.5, 7.5).
        self.stray_done = False
        self.stray_force_killed = False
        #: A ``reconnect`` was sent for an exec whose start we never saw: its reply says whether it runs.
        self.adopting = False
        #: Numbered stdin waits for the reconnect reply's ``stdin_ack`` before anything is resent.
        self.awaiting_stdin_ack = False

    def expect_error_frame(self, status: Status, kind: str) -> None:
        self.pending_errors.append(PendingError(status, kind))

    def take_pending_error(self) -> PendingError | None:
        """The most recent status that still lacks its message (6.1)."""
        return self.pending_errors.pop() if self.pending_errors else None

    def consume_stray(self, status: Status | str) -> bool:
        """``True`` if ``status`` is a frame we expected to trail an ended process."""
        if status is Status.SANDBOX_EXECUTION_DONE and self.stray_done:
            self.stray_done = False
            return True
        if status is Status.SANDBOX_EXECUTION_FORCE_KILLED and self.stray_force_killed:
            self.stray_force_killed = False
            return True
        return False
