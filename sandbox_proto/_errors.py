"""Exceptions shared by every adapter.

The public names are those of the upstream client, so ``except
SandboxConnectionError`` works the same on asyncio, trio and against code
written for upstream. Each error raised for a server refusal carries the
status and the text of the server's ``error`` frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._status import Status

if TYPE_CHECKING:
    from ._run import RunResult


class SandboxException(Exception):
    """Base class of every error this library raises about a sandbox."""

    def __init__(
        self,
        message: str,
        *,
        status: Status | str | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        #: The status frame that reported the error, if the server sent one.
        self.status = status
        #: The text of the server's ``error`` frame, if it sent one.
        self.server_message = server_message


class SandboxConnectionError(SandboxException):
    """The connection could not be opened, or ended while something waited on it."""


class SandboxCreationError(SandboxException):
    """The server refused to create or attach the sandbox."""


class SandboxExecutionError(SandboxException):
    """The server refused to start, or failed to run, an exec."""


class SandboxProcessError(SandboxException):
    """``run(..., check=True)``: the process exited with a non-zero exit code.

    The process ran to its end; :attr:`result` holds its output and exit code.
    """

    def __init__(self, message: str, *, result: RunResult) -> None:
        super().__init__(message)
        #: The finished run: ``stdout``, ``stderr`` and ``exit_code``.
        self.result = result


class SandboxStateError(SandboxException):
    """The call is not allowed in the sandbox's or the process's current state."""


class SandboxDeletedError(SandboxStateError):
    """The server removed the sandbox from this connection (idle expiry, handoff, lock loss)."""


class SandboxFilesystemSnapshotError(SandboxException):
    """A filesystem snapshot failed."""


class SandboxCheckpointError(SandboxException):
    """A checkpoint failed or was refused."""


class SandboxTimeoutError(SandboxException, TimeoutError):
    """A call did not complete within its timeout; the sandbox stays usable."""


class ProtocolError(SandboxException):
    """A breach of the protocol, by this side or by the peer."""


class LocalProtocolError(ProtocolError, SandboxStateError):
    """This side asked for something the current state does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a frame that is malformed or not allowed now."""
