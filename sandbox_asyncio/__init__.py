"""The Cloud Run Sandbox client for asyncio.

>>> async with Sandbox.create("http://127.0.0.1:8080") as sandbox:
...     process = await sandbox.exec("python", "print(6 * 7)")
...     print(await process.stdout.read_all())
"""

from _sandbox_anyio import PullTransport, Receiver, SandboxProcess, SandboxStream, Transport, TransportClosed
from sandbox_proto import (
    ReconnectPolicy,
    SandboxCheckpointError,
    SandboxConnectionError,
    SandboxCreationError,
    SandboxDeletedError,
    SandboxException,
    SandboxExecutionError,
    SandboxFilesystemSnapshotError,
    SandboxStateError,
    SandboxTimeoutError,
    Status,
)

from ._sandbox import Sandbox

__all__ = [
    "PullTransport",
    "Receiver",
    "ReconnectPolicy",
    "Sandbox",
    "SandboxCheckpointError",
    "SandboxConnectionError",
    "SandboxCreationError",
    "SandboxDeletedError",
    "SandboxException",
    "SandboxExecutionError",
    "SandboxFilesystemSnapshotError",
    "SandboxProcess",
    "SandboxStateError",
    "SandboxStream",
    "SandboxTimeoutError",
    "Status",
    "Transport",
    "TransportClosed",
]
