"""A sandbox: its directory, its token, its output log and its executions.

A :class:`Sandbox` outlives connections (protocol.md 1.1); the connection
attached to it, if any, is its observer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox_proto import CreateOptions, ExecutionView, ProcessPhase

from ._errors import ExecutionStartError
from ._execution import KILL_PIPE_GRACE, Execution
from ._janitor import kill_processes_of
from ._lease import HeldLease
from ._observer import SandboxObserver
from ._output import OutputLog
from ._storage import SandboxRecord

if TYPE_CHECKING:
    from ._manager import SandboxManager

__all__ = ["STOPPED_STATE", "Sandbox", "hash_token"]

logger = logging.getLogger("sandbox_server")

STOPPED_STATE = "SandboxState.STOPPED"


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Sandbox:
    """One sandbox: a working directory, a code bundle directory, and its executions."""

    def __init__(
        self,
        manager: SandboxManager,
        sandbox_id: str,
        token_hash: bytes,
        options: CreateOptions,
        directory: Path,
        bundle_dir: Path,
    ) -> None:
        self.manager = manager
        self.id = sandbox_id
        self.options = options
        self.directory = directory
        self.bundle_dir = bundle_dir
        # Only a hash is kept, so a memory dump or a debugger does not show the token (S4).
        self._token_hash = token_hash
        self.log = OutputLog(manager.output_limit)
        #: The current or most recent exec.
        self.execution: Execution | None = None
        #: Process groups that may still have members (background processes of finished execs).
        self.process_groups: set[int] = set()
        self.observer: SandboxObserver | None = None
        self.deleted = False
        #: A checkpoint, handoff, expiry or deletion has begun: no other one may start.
        self.leaving = False
        #: Its files are being saved: no exec may start.
        self.checkpointing = False
        #: The handoff lock, for sandboxes created with ``enable_sandbox_handoff``.
        self.lease: HeldLease | None = None
        self.last_activity = asyncio.get_running_loop().time()

    @property
    def workdir(self) -> Path:
        """The host path of the working directory of its execs."""
        return self.manager.isolation.workdir(self.directory)

    def __repr__(self) -> str:
        return f"<Sandbox {self.id}{' deleted' if self.deleted else ''}>"

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(self._token_hash, hash_token(token))

    def record(self, checkpoint: str | None) -> SandboxRecord:
        """The metadata to persist, pointing at ``checkpoint``."""
        return SandboxRecord(self.id, self._token_hash.hex(), self.options, checkpoint)

    def touch(self) -> None:
        """Restart the idle timer (S5: every inbound frame, and the end of an exec)."""
        self.last_activity = asyncio.get_running_loop().time()

    @property
    def busy(self) -> bool:
        return self.execution is not None and self.execution.running

    @property
    def checkpointable(self) -> bool:
        return self.options.enable_checkpoint and self.manager.checkpoint_enabled

    def execution_view(self) -> ExecutionView | None:
        return None if self.execution is None else self.execution.view()

    def phase(self) -> ProcessPhase:
        """What stdin and exec requests see (7.4), for a connection not streaming an exec."""
        ex = self.execution
        if self.deleted or ex is None:
            return ProcessPhase.NONE
        if ex.running:
            return ProcessPhase.RUNNING
        return ProcessPhase.NONE if ex.killed else ProcessPhase.EXITED

    def idle_expired(self, now: float) -> bool:
        timeout = self.options.idle_timeout
        return (
            bool(timeout)
            and not self.deleted
            and not self.leaving
            and not self.busy
            and now - self.last_activity > (timeout or 0)
        )

    async def start_exec(self, language: str, code: str, *, ref: str | None = None) -> Execution:
        if self.deleted or self.checkpointing:
            state = "SandboxState.CHECKPOINTING" if not self.deleted else STOPPED_STATE
            raise ExecutionStartError(
                f"Cannot execute code in a sandbox that is not in the RUNNING state (current state: {state})"
            )
        if self.busy:
            raise ExecutionStartError("An execution is already in progress.")
        isolation = self.manager.isolation
        uid = isolation.sandbox_uid(self.id)
        if uid is not None:
            self.manager.janitor.track("uid", uid)  # idempotent
        code_limit = isolation.limits.code
        size = len(code.encode("utf-8", "surrogatepass"))
        if code_limit and size > code_limit:
            raise ExecutionStartError(f"Code too large: {size} bytes; this server accepts at most {code_limit}.")
        if language == "python":
            script = self.bundle_dir / "main.py"
            program = [isolation.python, "-u"]
        else:
            script = self.bundle_dir / "main.sh"
            program = [self.manager.bash]
        command = isolation.command(self.id, program, script, self.directory, self.bundle_dir)
        # Output of an earlier exec that nobody streamed is given up for good
        # (still replayable by seq until evicted).
        self.log.mark_delivered(self.log.last_seq)
        execution = Execution(self, language, ref)
        try:
            # User code may have removed its working directory; give it a fresh one rather than fail.
            if not self.workdir.is_dir():
                await asyncio.to_thread(isolation.prepare_directory, self.id, self.directory)
            self.manager.prepare_bundle(self)
            script.write_text(code, encoding="utf-8", errors="surrogatepass")
            script.chmod(0o644)
            await execution.start(command, self.workdir)
        except OSError as exc:
            # Never the path: only the OS's reason.
            logger.warning("sandbox %s: cannot start %s: %s", self.id, language, exc)
            raise ExecutionStartError(f"Failed to start the {language} process: {exc.strerror or 'OS error'}") from None
        self.execution = execution
        self.touch()
        logger.debug("sandbox %s: exec %s started, pid %d", self.id, language, execution.pid)
        return execution

    def _execution_finished(self, execution: Execution) -> None:
        self.touch()
        self._prune_process_groups()
        self.log.changed.fire()
        logger.debug("sandbox %s: exec finished with %s", self.id, execution.exit_code)

    def mark_delivered(self, seq: int) -> None:
        self.log.mark_delivered(seq)
        ex = self.execution
        if ex is not None and not self.log.full:
            ex.resume_reading()

    def add_process_group(self, pgid: int) -> None:
        self.process_groups.add(pgid)
        self.manager.janitor.track("pg", pgid)

    def _prune_process_groups(self) -> None:
        for pgid in list(self.process_groups):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                self.process_groups.discard(pgid)
                self.manager.janitor.forget("pg", pgid)
            except PermissionError:
                pass

    def kill_all(self) -> None:
        """SIGKILL every process this sandbox ever started that may still live.

        Under bwrap as root every one of them runs as the sandbox's own uid,
        which no process can leave: killing by uid misses none, even one
        started in the instant bwrap's own processes were killed.
        """
        if self.execution is not None and self.execution.running:
            self.execution.kill()
        for pgid in list(self.process_groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            self.manager.janitor.forget("pg", pgid)
        self.process_groups.clear()
        uid = self.manager.isolation.sandbox_uid(self.id)
        if uid is not None:
            if not kill_processes_of({uid}, timeout=KILL_PIPE_GRACE):
                logger.error("sandbox %s: processes of uid %d survive SIGKILL", self.id, uid)
            if self.deleted:
                self.manager.janitor.forget("uid", uid)

    async def wait_execution_end(self) -> None:
        """Wait (bounded) for a killed exec's pipes to close, and its stdin writer to stop."""
        ex = self.execution
        if ex is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_PIPE_GRACE + 2):
                    await ex.finished.wait()
            await ex.wait_stdin_writer()
