"""Failures of sandbox operations, each with the text the client is shown."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointInProgressError",
    "CreationError",
    "ExecutionStartError",
    "PermissionDeniedError",
    "RestoreError",
    "SandboxNotFoundError",
    "SnapshotError",
]


class ExecutionStartError(Exception):
    """An exec could not be started; the text is safe to show to the client."""


class CheckpointError(Exception):
    """A checkpoint failed or is not possible; the text follows ``Failed to checkpoint sandbox <ID>: ``."""


class CheckpointInProgressError(CheckpointError):
    """A checkpoint was asked for while an exec runs."""


class SnapshotError(Exception):
    """A snapshot failed; the text follows ``Failed to snapshot filesystem for sandbox <ID>: ``."""


class CreationError(Exception):
    """A create failed; the text is the client's ``error`` message."""


class RestoreError(Exception):
    """An attach could not restore; the text follows ``Failed to restore sandbox <ID>: ``."""


class SandboxNotFoundError(Exception):
    """No sandbox and no persisted metadata under that id."""


class PermissionDeniedError(Exception):
    """The token does not match the persisted one."""
