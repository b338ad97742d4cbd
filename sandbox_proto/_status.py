"""Every status value of the wire protocol, and how a client classifies them."""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    """The 34 values of ``status_update`` frames (protocol.md section 5).

    Unknown values never reach this enum: the codec keeps them as plain
    strings (see :func:`parse_status`) so that a newer server cannot crash
    an older client.
    """

    # Enum's own __hash__ is a Python function; a member equals its value, so
    # the str hash is right, and the sets of statuses below are probed per frame.
    __hash__ = str.__hash__

    SANDBOX_CREATING = "SANDBOX_CREATING"
    SANDBOX_RUNNING = "SANDBOX_RUNNING"
    SANDBOX_NOT_FOUND = "SANDBOX_NOT_FOUND"
    SANDBOX_IN_USE = "SANDBOX_IN_USE"
    SANDBOX_CREATION_ERROR = "SANDBOX_CREATION_ERROR"
    SANDBOX_PERMISSION_DENIAL_ERROR = "SANDBOX_PERMISSION_DENIAL_ERROR"
    SANDBOX_RESTORING = "SANDBOX_RESTORING"
    SANDBOX_RESTORE_ERROR = "SANDBOX_RESTORE_ERROR"
    SANDBOX_EXECUTION_RUNNING = "SANDBOX_EXECUTION_RUNNING"
    SANDBOX_EXECUTION_DONE = "SANDBOX_EXECUTION_DONE"
    SANDBOX_EXECUTION_ERROR = "SANDBOX_EXECUTION_ERROR"
    SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR = "SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR"
    SANDBOX_STDIN_ERROR = "SANDBOX_STDIN_ERROR"
    SANDBOX_EXECUTION_FORCE_KILLED = "SANDBOX_EXECUTION_FORCE_KILLED"
    SANDBOX_EXECUTION_FORCE_KILL_ERROR = "SANDBOX_EXECUTION_FORCE_KILL_ERROR"
    SANDBOX_CHECKPOINTING = "SANDBOX_CHECKPOINTING"
    SANDBOX_CHECKPOINTED = "SANDBOX_CHECKPOINTED"
    SANDBOX_CHECKPOINT_ERROR = "SANDBOX_CHECKPOINT_ERROR"
    SANDBOX_EXECUTION_IN_PROGRESS_ERROR = "SANDBOX_EXECUTION_IN_PROGRESS_ERROR"
    SANDBOX_FILESYSTEM_SNAPSHOT_CREATING = "SANDBOX_FILESYSTEM_SNAPSHOT_CREATING"
    SANDBOX_FILESYSTEM_SNAPSHOT_CREATED = "SANDBOX_FILESYSTEM_SNAPSHOT_CREATED"
    SANDBOX_FILESYSTEM_SNAPSHOT_ERROR = "SANDBOX_FILESYSTEM_SNAPSHOT_ERROR"
    SANDBOX_DELETING = "SANDBOX_DELETING"
    SANDBOX_DELETED = "SANDBOX_DELETED"
    SANDBOX_KILLING = "SANDBOX_KILLING"
    SANDBOX_KILLED = "SANDBOX_KILLED"
    SANDBOX_KILL_ERROR = "SANDBOX_KILL_ERROR"
    SANDBOX_LOCK_ACQUIRING = "SANDBOX_LOCK_ACQUIRING"
    SANDBOX_LOCK_ACQUIRED = "SANDBOX_LOCK_ACQUIRED"
    SANDBOX_LOCK_RELEASING = "SANDBOX_LOCK_RELEASING"
    SANDBOX_LOCK_RELEASED = "SANDBOX_LOCK_RELEASED"
    SANDBOX_LOCK_RELEASE_REQUESTED = "SANDBOX_LOCK_RELEASE_REQUESTED"
    SANDBOX_LOCK_RENEWAL_ERROR = "SANDBOX_LOCK_RENEWAL_ERROR"
    SANDBOX_ERROR = "SANDBOX_ERROR"

    def __str__(self) -> str:
        return self.value


# A dict rather than ``Status(value)``: the enum's lookup costs a few µs per frame.
# It also knows the former name of FORCE_KILLED, seen in old upstream transcripts.
_BY_VALUE: dict[str, Status] = {
    **{status.value: status for status in Status},
    "SANDBOX_EXECUTION_FORCE_TERMINATED": Status.SANDBOX_EXECUTION_FORCE_KILLED,
}


def parse_status(value: str) -> Status | str:
    """Map a wire value to :class:`Status`; unknown values come back unchanged."""
    return _BY_VALUE.get(value, value)


#: Statuses after which upstream clients never auto-reconnect, plus the three
#: protocol.md section 5 recommends adding (the sandbox left this connection).
FATAL_STATUSES = frozenset(
    {
        Status.SANDBOX_ERROR,
        Status.SANDBOX_NOT_FOUND,
        Status.SANDBOX_CREATION_ERROR,
        Status.SANDBOX_CHECKPOINT_ERROR,
        Status.SANDBOX_RESTORE_ERROR,
        Status.SANDBOX_DELETED,
        Status.SANDBOX_LOCK_RENEWAL_ERROR,
        Status.SANDBOX_PERMISSION_DENIAL_ERROR,
        Status.SANDBOX_KILLED,
        Status.SANDBOX_CHECKPOINTED,
        Status.SANDBOX_LOCK_RELEASE_REQUESTED,
    }
)

#: Error statuses that the server follows with an ``error`` frame (section 6.1).
#: SANDBOX_CHECKPOINT_ERROR is in it only when it answers our own request.
ERROR_FRAME_STATUSES = frozenset(
    {
        Status.SANDBOX_CREATION_ERROR,
        Status.SANDBOX_PERMISSION_DENIAL_ERROR,
        Status.SANDBOX_RESTORE_ERROR,
        Status.SANDBOX_EXECUTION_ERROR,
        Status.SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR,
        Status.SANDBOX_STDIN_ERROR,
        Status.SANDBOX_CHECKPOINT_ERROR,
        Status.SANDBOX_EXECUTION_IN_PROGRESS_ERROR,
        Status.SANDBOX_FILESYSTEM_SNAPSHOT_ERROR,
        Status.SANDBOX_ERROR,
    }
)

#: Statuses that belong to the active process rather than to the sandbox.
PROCESS_STATUSES = frozenset(
    {
        Status.SANDBOX_EXECUTION_RUNNING,
        Status.SANDBOX_EXECUTION_DONE,
        Status.SANDBOX_EXECUTION_ERROR,
        Status.SANDBOX_EXECUTION_UNSUPPORTED_LANGUAGE_ERROR,
        Status.SANDBOX_EXECUTION_FORCE_KILLED,
        Status.SANDBOX_EXECUTION_FORCE_KILL_ERROR,
        Status.SANDBOX_STDIN_ERROR,
    }
)
