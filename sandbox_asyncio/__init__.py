"""The Cloud Run Sandbox client for asyncio.

>>> async with Sandbox.create("http://127.0.0.1:8080") as sandbox:
...     process = await sandbox.exec("python", "print(6 * 7)")
...     print(await process.stdout.read_all())
"""

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

from ._process import SandboxProcess, SandboxStream
from ._sandbox import Sandbox
from ._transport import Transport

__all__ = [
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
]
