"""The Cloud Run Sandbox client for trio: the same ``Sandbox`` as ``sandbox_asyncio``.

>>> async with Sandbox.create("http://127.0.0.1:8080") as sandbox:
...     process = await sandbox.exec("python", "print(6 * 7)")
...     print(await process.stdout.read_all())
"""

from _sandbox_anyio import SandboxProcess, SandboxStream
from sandbox_proto import (
    ReconnectPolicy,
    RunResult,
    SandboxCheckpointError,
    SandboxConnectionError,
    SandboxCreationError,
    SandboxDeletedError,
    SandboxException,
    SandboxExecutionError,
    SandboxFilesystemSnapshotError,
    SandboxProcessError,
    SandboxStateError,
    SandboxTimeoutError,
    Status,
)

from ._sandbox import Sandbox

__all__ = [
    "ReconnectPolicy",
    "RunResult",
    "Sandbox",
    "SandboxCheckpointError",
    "SandboxConnectionError",
    "SandboxCreationError",
    "SandboxDeletedError",
    "SandboxException",
    "SandboxExecutionError",
    "SandboxFilesystemSnapshotError",
    "SandboxProcess",
    "SandboxProcessError",
    "SandboxStateError",
    "SandboxStream",
    "SandboxTimeoutError",
    "Status",
]
