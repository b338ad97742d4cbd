"""The Cloud Run Sandbox client with blocking calls: scripts, notebooks, threads.

>>> with Sandbox.create("http://127.0.0.1:8080") as sandbox:
...     process = sandbox.exec("python", "print(6 * 7)")
...     print(process.stdout.read_all())

The same names, options, return types and exceptions as ``sandbox_asyncio``,
without ``await``.

How it works, and why: of the three ways to offer a blocking API on the same
core (a generated sync twin, as httpcore's ``unasync``; the async client on a
private event loop in a background thread, as Modal's SDK; a sync transport
driving the sans-IO core), this is the second. ``sandbox_asyncio.Sandbox`` runs
on one asyncio loop in a daemon thread, started on first use and stopped at
interpreter exit, and each blocking call is one call through anyio's blocking
portal. So there is one code path: every protocol decision, timeout,
cancellation rule and reconnect is the async client's, not a second copy to
keep in step; it works where the caller's thread already runs an event loop
(a Jupyter cell), because the caller's loop is never used; and a sandbox made
in one thread can be used from any other (the loop thread owns it). A sync
transport would have needed its own reader thread, keepalive, back-pressure
and reconnect logic (a second driver); a generated twin, a second copy of the
driver to ship and test. The cost is a thread hop per call, measured by
``python -m bench --only sync`` (``docs/performance.md``).
"""

from _sandbox_anyio import AttachOptions, CreateOptions
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

from ._sandbox import Sandbox, SandboxProcess, SandboxStream

__all__ = [
    "AttachOptions",
    "CreateOptions",
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
