"""Compatibility alias for code written against the upstream client: ``from sandbox import Sandbox``."""

from sandbox_asyncio import Sandbox, SandboxProcess, SandboxStream

from .exceptions import (
    SandboxCheckpointError,
    SandboxConnectionError,
    SandboxCreationError,
    SandboxException,
    SandboxExecutionError,
    SandboxFilesystemSnapshotError,
    SandboxStateError,
)

__all__ = [
    "Sandbox",
    "SandboxCheckpointError",
    "SandboxConnectionError",
    "SandboxCreationError",
    "SandboxException",
    "SandboxExecutionError",
    "SandboxFilesystemSnapshotError",
    "SandboxProcess",
    "SandboxStateError",
    "SandboxStream",
]
