"""Upstream's ``sandbox.exceptions`` module: the same classes every adapter raises."""

from sandbox_proto import (
    SandboxCheckpointError,
    SandboxConnectionError,
    SandboxCreationError,
    SandboxException,
    SandboxExecutionError,
    SandboxFilesystemSnapshotError,
    SandboxStateError,
)

__all__ = [
    "SandboxCheckpointError",
    "SandboxConnectionError",
    "SandboxCreationError",
    "SandboxException",
    "SandboxExecutionError",
    "SandboxFilesystemSnapshotError",
    "SandboxStateError",
]
