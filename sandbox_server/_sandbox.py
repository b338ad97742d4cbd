"""Sandboxes and their processes: everything the server does that is not WebSocket.

A :class:`Sandbox` is a directory plus the processes run in it; it outlives
connections (protocol.md 1.1). Each exec is an :class:`Execution`: one fresh
process in its own process group, whose output is decoded and appended to the
sandbox's :class:`OutputLog`. A connection streams an execution by reading
that log; when nobody reads, the log fills up and the pipes stop being read
(back-pressure, S12) instead of dropping data.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sandbox_proto import (
    MSG_CHECKPOINT_IN_PROGRESS,
    MSG_SNAPSHOT_DISABLED,
    CreateOptions,
    ExecutionView,
    ProcessPhase,
    Status,
    Stream,
    valid_snapshot_name,
)

from ._isolation import BwrapIsolation, Command, Isolation, Limits, NoIsolation
from ._lease import HeldLease, LeaseError, LeaseStore, Waiter
from ._storage import MetadataError, SandboxRecord, Storage

__all__ = [
    "CheckpointError",
    "CheckpointInProgressError",
    "CreationError",
    "Execution",
    "ExecutionStartError",
    "OutputChunk",
    "OutputLog",
    "PermissionDeniedError",
    "RestoreError",
    "Sandbox",
    "SandboxManager",
    "SandboxNotFoundError",
    "SandboxObserver",
    "SnapshotError",
]

logger = logging.getLogger("sandbox_server")

#: Size of one pipe read, and so the largest output frame (4.3).
READ_SIZE = 1024
DEFAULT_OUTPUT_LIMIT = 16 * 2**20
STOPPED_STATE = "SandboxState.STOPPED"
#: How long a killed exec may keep its pipes open (escaped grandchildren) before we close them.
KILL_PIPE_GRACE = 1.0
#: Stdin an exec may have queued beyond what the rate limit lets through, in seconds of the rate.
STDIN_BACKLOG_SECONDS = 8


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


#: Sends one status frame to the connection being set up.
Notify = Callable[[Status], Awaitable[None]]


class SandboxObserver(Protocol):
    """The connection attached to a sandbox, as the sandbox's lifecycle sees it."""

    async def sandbox_status(self, status: Status) -> None: ...

    async def sandbox_error(self, status: Status, message: str) -> None: ...

    async def wait_stream_end(self) -> None: ...


class _Signal:
    """Wake every current waiter; cheap, edge-triggered, single-threaded."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(frozen=True, slots=True)
class OutputChunk:
    seq: int
    stream: Stream
    data: str
    size: int  # bytes read from the pipe for this chunk: what the bounds count


class OutputLog:
    """Every output frame of a sandbox, numbered, retained up to a byte bound.

    Frames not yet delivered to a connection are never evicted (they are the
    detached-output queue); delivered ones are kept for ``seq`` replay until
    the bound pushes them out.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._frames: list[OutputChunk] = []
        self._head = 0  # index of the oldest retained frame in _frames
        self._retained_bytes = 0
        self.undelivered_bytes = 0
        self.next_seq = 1
        #: Highest seq handed to a connection.
        self.delivered = 0
        self.changed = _Signal()

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def full(self) -> bool:
        return self.undelivered_bytes >= self.limit

    def _index(self, seq: int) -> int:
        first = self._frames[self._head].seq if self._head < len(self._frames) else self.next_seq
        return self._head + max(0, seq - first)

    def append(self, stream: Stream, data: str, size: int) -> OutputChunk:
        chunk = OutputChunk(self.next_seq, stream, data, size)
        self.next_seq += 1
        self._frames.append(chunk)
        self._retained_bytes += size
        self.undelivered_bytes += size
        self._evict()
        self.changed.fire()
        return chunk

    def frames_after(self, seq: int, upto: int, limit: int) -> list[OutputChunk]:
        """Up to ``limit`` retained frames with ``seq < frame.seq <= upto``, oldest first."""
        start = self._index(seq + 1)
        # Seqs are contiguous in the list, so ``upto`` maps to an index too.
        end = min(self._index(upto + 1), start + limit) if upto > seq else start
        return self._frames[start:end]

    def mark_delivered(self, seq: int) -> None:
        if seq <= self.delivered:
            return
        for chunk in self._frames[self._index(self.delivered + 1) : self._index(seq + 1)]:
            self.undelivered_bytes -= chunk.size
        self.delivered = seq
        self._evict()

    def _evict(self) -> None:
        frames = self._frames
        while (
            self._retained_bytes > self.limit and self._head < len(frames) and frames[self._head].seq <= self.delivered
        ):
            self._retained_bytes -= frames[self._head].size
            self._head += 1
        # Compact now and then so the list does not grow without end.
        if self._head > 1024 and self._head * 2 > len(frames):
            del frames[: self._head]
            self._head = 0


class _ExecProtocol(asyncio.SubprocessProtocol):
    """Forwards pipe events to the execution (exit and end-of-file are separate events)."""

    def __init__(self, execution: Execution) -> None:
        self._execution = execution

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self._execution._on_data(fd, data if isinstance(data, bytes) else data.encode())

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._execution._on_pipe_closed(fd)

    def process_exited(self) -> None:
        self._execution._on_exit()

    def pause_writing(self) -> None:
        self._execution._stdin_paused = True

    def resume_writing(self) -> None:
        self._execution._stdin_paused = False
        self._execution._stdin_signal.fire()


class Execution:
    """One exec: a process, its decoders, and where its output frames start and end."""

    def __init__(self, sandbox: Sandbox, language: str, ref: str | None = None) -> None:
        #: The client's name for this exec (extension ``exec_ref``), echoed when its stream is resumed.
        self.ref = ref
        self.sandbox = sandbox
        self.language = language
        self.first_seq = sandbox.log.next_seq
        #: Seq of this exec's latest frame (``first_seq - 1`` while it has none).
        self.last_seq = self.first_seq - 1
        self.exit_code: int | None = None
        self.killed = False
        #: Set once the process exited and both output pipes reached end-of-file.
        self.finished = asyncio.Event()
        #: A connection has sent this exec's DONE.
        self.done_delivered = False
        self.pid = 0
        self._transport: asyncio.SubprocessTransport | None = None
        self._decoders = {
            1: codecs.getincrementaldecoder("utf-8")(errors="replace"),
            2: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self._open_pipes = {1, 2}
        self._exited = False
        self._paused = False
        self._stdin_paused = False
        self._stdin_closed = False
        self._stdin_signal = _Signal()
        # Stdin lives here, not on a connection: what one connection accepted
        # is written even if it drops, before what the next one accepts.
        #: Highest stdin seq accepted (queued) for this process (extension ``stdin_seq``).
        self.stdin_seq = 0
        self._stdin_items: deque[str | None] = deque()  # None: close stdin
        #: Stdin bytes queued and not yet written to the process.
        self._stdin_backlog = 0
        self._stdin_writer: asyncio.Task[None] | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        limits = sandbox.manager.isolation.limits
        #: Bytes both streams may still carry before the exec is ended (0 = no cap).
        self._output_left = limits.output or -1
        self.output_exceeded = False

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    def view(self) -> ExecutionView:
        """What a ``reconnect`` reply is decided on."""
        sandbox = self.sandbox
        return ExecutionView(
            running=self.running,
            done_delivered=self.done_delivered,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            delivered=sandbox.log.delivered,
            stdin_seq=self.stdin_seq,
            exit_code=self.exit_code,
            sandbox_deleted=sandbox.deleted,
            ref=self.ref,
        )

    async def start(self, command: Command, cwd: Path) -> None:
        loop = asyncio.get_running_loop()
        pass_fds: tuple[int, ...] = ()
        if command.piped_args is not None:
            read_end, write_end = os.pipe()
            pass_fds = (read_end,)
            try:
                # A few KiB: fits in the pipe buffer, so this cannot block.
                os.write(write_end, b"".join(arg.encode() + b"\0" for arg in command.piped_args))
            finally:
                os.close(write_end)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _ExecProtocol(self),
                *command.spawn_argv(pass_fds[0] if pass_fds else -1),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=command.env,
                pass_fds=pass_fds,
                # Own process group, so a kill reaches everything the exec started (S14).
                start_new_session=True,
            )
        finally:
            for fd in pass_fds:
                os.close(fd)
        self._transport = transport
        self.pid = transport.get_pid()
        self.sandbox.process_groups.add(self.pid)
        if self.sandbox.log.full:
            self.pause_reading()

    # -- pipe events -------------------------------------------------------

    def _on_data(self, fd: int, data: bytes) -> None:
        if self.killed:
            return  # upstream discards what is still unread after a kill (7.5)
        stream: Stream = "stdout" if fd == 1 else "stderr"
        decoder = self._decoders[fd]
        log = self.sandbox.log
        if self._output_left >= 0:
            if len(data) > self._output_left:
                data = data[: self._output_left]
                self._output_left = 0
                self.output_exceeded = True
            else:
                self._output_left -= len(data)
        # One frame per 1024-byte piece; the incremental decoder carries a split
        # character over to the next piece instead of losing the stream (S2).
        for start in range(0, len(data), READ_SIZE):
            piece = data[start : start + READ_SIZE]
            text = decoder.decode(piece)
            if text:
                self.last_seq = log.append(stream, text, len(piece)).seq
        if self.output_exceeded:
            self._end_for_output()
        elif log.full:
            self.pause_reading()

    def _end_for_output(self) -> None:
        """The output cap is reached: kill the exec and say why on its stderr, before its DONE."""
        limit = self.sandbox.manager.isolation.limits.output
        self.kill()
        self._note(f"output limit exceeded: the exec wrote more than {limit} bytes and was killed")

    def _note(self, text: str) -> None:
        """A message from the server on the exec's stderr stream."""
        for fd in (1, 2):
            # Close any half-decoded character first, so the note starts on its own.
            tail = self._decoders[fd].decode(b"", final=True)
            if tail:
                self.last_seq = self.sandbox.log.append("stdout" if fd == 1 else "stderr", tail, 0).seq
        self.last_seq = self.sandbox.log.append("stderr", f"\n[sandbox] {text}\n", 0).seq

    def _on_pipe_closed(self, fd: int) -> None:
        if fd == 0:
            self._stdin_closed = True
            self._stdin_signal.fire()
            return
        if fd not in self._open_pipes:
            return
        self._open_pipes.discard(fd)
        tail = self._decoders[fd].decode(b"", final=True)
        if tail and not self.killed:
            stream: Stream = "stdout" if fd == 1 else "stderr"
            self.last_seq = self.sandbox.log.append(stream, tail, 0).seq
        self._maybe_finish()

    def _on_exit(self) -> None:
        self._exited = True
        if self.killed:
            self._arm_kill_timer()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self._exited or self._open_pipes or self.finished.is_set():
            return
        assert self._transport is not None
        self.exit_code = self._transport.get_returncode()
        isolation = self.sandbox.manager.isolation
        xcpu = 128 + signal.SIGXCPU if isolation.shell_style_signals else -signal.SIGXCPU
        if self.exit_code == xcpu and not self.killed and isolation.limits.cpu_seconds:
            self._note(f"CPU time limit exceeded: a process used {isolation.limits.cpu_seconds} s of CPU and was ended")
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._transport.close()
        self.finished.set()
        self._stdin_signal.fire()
        self.sandbox._execution_finished(self)

    def _arm_kill_timer(self) -> None:
        # A killed exec whose pipes are held open by an escaped grandchild would
        # never reach end-of-file; stop waiting for it after a short grace.
        if self._kill_timer is None and not self.finished.is_set():
            self._kill_timer = asyncio.get_running_loop().call_later(KILL_PIPE_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        if self._transport is None:
            return
        for fd in (1, 2):
            pipe = self._transport.get_pipe_transport(fd)
            if pipe is not None:
                pipe.close()

    # -- flow control ------------------------------------------------------

    def pause_reading(self) -> None:
        if self._transport is None or self._paused or self.finished.is_set():
            return
        self._paused = True
        for fd in self._open_pipes:
            pipe = self._transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport):
                pipe.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is None or not self._paused:
            return
        self._paused = False
        for fd in self._open_pipes:
            pipe = self._transport.get_pipe_transport(fd)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                pipe.resume_reading()

    # -- requests ----------------------------------------------------------

    def queue_stdin(self, data: str | None, seq: int | None = None) -> bool:
        """Accept stdin (``None``: close it) to be written in order; ``False`` when the rate limit refuses it.

        Throttled writes queue up here; past a few seconds' worth of the rate
        the client is flooding, and the data is refused instead.
        """
        if data is not None:
            rate = self.sandbox.manager.isolation.limits.stdin_rate
            size = _stdin_size(data)
            if rate and self._stdin_backlog and self._stdin_backlog + size > rate * STDIN_BACKLOG_SECONDS:
                return False
            self._stdin_backlog += size
        if seq is not None:
            self.stdin_seq = max(self.stdin_seq, seq)
        self._stdin_items.append(data)
        if self._stdin_writer is None:
            self._stdin_writer = asyncio.create_task(self._write_stdin_forever(), name=f"stdin-{self.pid}")
        else:
            self._stdin_signal.fire()
        return True

    async def _write_stdin_forever(self) -> None:
        """Write queued stdin in order, at most at the stdin rate; ends with the process."""
        loop = asyncio.get_running_loop()
        rate = self.sandbox.manager.isolation.limits.stdin_rate
        # Token bucket, one second deep; a write may overdraw it and the next one waits.
        tokens = float(rate)
        refilled = loop.time()
        items = self._stdin_items
        while True:
            if not items:
                if self.finished.is_set():
                    return
                await self._stdin_signal.wait()  # fired on queue_stdin and when the process ends
                continue
            data = items.popleft()
            if data is None:
                self.close_stdin()
                continue
            size = _stdin_size(data)
            try:
                if rate:
                    now = loop.time()
                    tokens = min(float(rate), tokens + (now - refilled) * rate)
                    refilled = now
                    if tokens < 0:
                        # Cut short when the process ends: the write is then dropped anyway.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.finished.wait(), -tokens / rate)
                        tokens, refilled = 0.0, loop.time()
                    tokens -= size
                await self.write_stdin(data)
            except OSError as exc:
                await _report(
                    self.sandbox.observer, Status.SANDBOX_ERROR, f"Failed to write to stdin: {exc.strerror or exc}"
                )
            finally:
                self._stdin_backlog -= size

    async def wait_stdin_writer(self) -> None:
        """Wait (bounded) for the stdin writer, which ends once the process has ended."""
        writer = self._stdin_writer
        if writer is not None and not writer.done():
            _, pending = await asyncio.wait([writer], timeout=KILL_PIPE_GRACE)
            if pending:
                writer.cancel()  # stuck telling a connection about a write error
                await asyncio.wait([writer])

    async def write_stdin(self, data: str) -> None:
        """Write verbatim; silently dropped once the process has exited (7.4)."""
        if self._exited or self.finished.is_set() or self.killed:
            return
        if self._stdin_closed or self._transport is None:
            raise BrokenPipeError("stdin of the process is closed")
        pipe = self._transport.get_pipe_transport(0)
        if not isinstance(pipe, asyncio.WriteTransport) or pipe.is_closing():
            raise BrokenPipeError("stdin of the process is closed")
        pipe.write(data.encode())
        # drain(): wait while the pipe is above its high-water mark.
        while self._stdin_paused and not self._stdin_closed and not self.finished.is_set():
            await self._stdin_signal.wait()
        if self._stdin_closed and not self._exited and not self.killed:
            raise BrokenPipeError("Broken pipe")

    def close_stdin(self) -> None:
        if self._transport is None or self._stdin_closed:
            return
        pipe = self._transport.get_pipe_transport(0)
        if pipe is not None:
            pipe.close()

    def kill(self) -> None:
        """SIGKILL the whole process group of this exec (S14)."""
        if self.finished.is_set():
            return
        self.killed = True
        # Output already read stays in the log; nothing more is read (7.5).
        self.resume_reading()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self._exited:
            self._arm_kill_timer()


def _stdin_size(data: str) -> int:
    return len(data.encode("utf-8", "surrogatepass"))


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
        code_limit = isolation.limits.code
        size = len(code.encode("utf-8", "surrogatepass"))
        if code_limit and size > code_limit:
            raise ExecutionStartError(f"Code too large: {size} bytes; this server accepts at most {code_limit}.")
        if language == "python":
            script = self.bundle_dir / "main.py"
            program = [sys.executable, "-u"]
        else:
            script = self.bundle_dir / "main.sh"
            program = [self.manager.bash]
        command = isolation.command(self.id, program, script, self.directory, self.bundle_dir)
        # Output of an earlier exec that nobody streamed is given up for good
        # (still replayable by seq until evicted).
        self.log.mark_delivered(self.log.last_seq)
        execution = Execution(self, language, ref)
        try:
            # User code may have removed its own directory; give it a fresh one rather than fail.
            if not self.directory.is_dir():
                await asyncio.to_thread(isolation.prepare_directory, self.id, self.directory)
            self.manager.prepare_bundle(self)
            script.write_text(code, encoding="utf-8", errors="surrogatepass")
            script.chmod(0o644)
            await execution.start(command, self.directory)
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

    def _prune_process_groups(self) -> None:
        for pgid in list(self.process_groups):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                self.process_groups.discard(pgid)
            except PermissionError:
                pass

    def kill_all(self) -> None:
        """SIGKILL every process group this sandbox ever started that may still live."""
        if self.execution is not None and self.execution.running:
            self.execution.kill()
        for pgid in list(self.process_groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        self.process_groups.clear()

    async def wait_execution_end(self) -> None:
        """Wait (bounded) for a killed exec's pipes to close, and its stdin writer to stop."""
        ex = self.execution
        if ex is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_PIPE_GRACE + 2):
                    await ex.finished.wait()
            await ex.wait_stdin_writer()


def _new_sandbox_id() -> str:
    return "sandbox-" + secrets.token_hex(6)  # 48 random bits (S4)


class SandboxManager:
    """The sandboxes of one server instance, their directories, the idle sweep and the handoff locks.

    Several managers (server processes) may share one state directory: they
    share metadata, checkpoints, snapshots and leases, and each keeps its live
    sandboxes under ``instances/<instance id>/`` so two copies of a restored
    sandbox never share a directory.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        instance_id: str | None = None,
        checkpoint_enabled: bool = False,
        snapshots_enabled: bool = False,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idle_sweep_interval: float = 0.25,
        lease_duration: float = 60.0,
        lease_renewal_interval: float = 20.0,
        lock_wait_timeout: float = 30.0,
        handoff_poll_interval: float = 1.0,
        lock_poll_interval: float = 0.25,
        isolation: Isolation | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.isolation = isolation if isolation is not None else NoIsolation(Limits())
        self.instance_id = instance_id or secrets.token_hex(8)
        self.checkpoint_enabled = checkpoint_enabled
        self.snapshots_enabled = snapshots_enabled
        self.output_limit = output_limit
        self.idle_sweep_interval = idle_sweep_interval
        self.lease_renewal_interval = lease_renewal_interval
        self.lock_wait_timeout = lock_wait_timeout
        self.handoff_poll_interval = handoff_poll_interval
        self.lock_poll_interval = lock_poll_interval
        self.storage = Storage(state_dir)
        self.leases = LeaseStore(state_dir / "leases", self.instance_id, duration=lease_duration)
        self.sandboxes: dict[str, Sandbox] = {}
        self.bash = shutil.which("bash") or "/bin/bash"
        self._sweeper: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Restores in progress on this instance, so two attaches do not restore one sandbox twice.
        self._restoring: dict[str, asyncio.Future[None]] = {}

    @property
    def instance_dir(self) -> Path:
        return self.state_dir / "instances" / self.instance_id

    @property
    def sandboxes_dir(self) -> Path:
        return self.instance_dir / "sandboxes"

    @property
    def bundles_dir(self) -> Path:
        return self.instance_dir / "bundles"

    def prepare_bundle(self, sandbox: Sandbox) -> None:
        """The bundle directory, with the account files a bwrap sandbox mounts over /etc."""
        bundle = sandbox.bundle_dir
        bundle.mkdir(parents=True, exist_ok=True)
        isolation = self.isolation
        if isinstance(isolation, BwrapIsolation) and not (bundle / "group").exists():
            # Read by the sandbox's own uid, whatever the server's umask; the state directory
            # above stays private to the server.
            bundle.chmod(0o755)
            passwd, group = isolation.account_files(sandbox.id)
            for name, text in (("passwd", passwd), ("group", group)):
                (bundle / name).write_text(text, encoding="utf-8")
                (bundle / name).chmod(0o644)

    async def start(self) -> None:
        isolation = self.isolation
        limits = isolation.limits
        logger.info(
            "isolation: %s; limits: memory %s, cpu %s s, processes %s, output %s, code %s, stdin %s B/s",
            isolation.describe(),
            limits.memory or "off",
            limits.cpu_seconds or "off",
            (limits.processes or "off") if isolation.enforces_processes else "not enforced",
            limits.output or "off",
            limits.code or "off",
            limits.stdin_rate or "off",
        )
        if not isinstance(isolation, BwrapIsolation):
            logger.warning(
                "isolation: none -- sandboxes run as plain processes of this user: code is NOT isolated "
                "from this machine (isolation needs bubblewrap and --isolation auto or bwrap)"
            )
        elif isolation.exposes(self.state_dir):
            logger.warning("the state directory is inside a directory that sandboxes can read: they can see each other")
        if self.checkpoint_enabled:
            logger.info("checkpoints keep a sandbox's files only: its processes cannot be saved without gVisor")
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        self.storage.prepare()
        self.leases.prepare()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sandbox-idle-sweep")
        if self.checkpoint_enabled:
            self._keeper = asyncio.create_task(self._keep_leases_forever(), name="sandbox-lease-keeper")

    def get(self, sandbox_id: str) -> Sandbox | None:
        return self.sandboxes.get(sandbox_id)

    def _unused_id(self) -> str:
        while True:
            sandbox_id = _new_sandbox_id()
            # Other instances share the state directory: their ids are taken too (S13).
            if (
                sandbox_id not in self.sandboxes
                and not self.storage.has_metadata(sandbox_id)
                and self.leases.read(sandbox_id) is None
            ):
                return sandbox_id

    def _new_sandbox(self, sandbox_id: str, token_hash: bytes, options: CreateOptions) -> Sandbox:
        return Sandbox(
            self, sandbox_id, token_hash, options, self.sandboxes_dir / sandbox_id, self.bundles_dir / sandbox_id
        )

    # -- create and restore ------------------------------------------------

    async def create(self, options: CreateOptions, notify: Notify) -> tuple[Sandbox, str]:
        """Set up a new sandbox; returns it and its token (the only time the token exists in clear).

        ``notify`` sends the lock statuses of a handoff-enabled create (7.1);
        failures raise :class:`CreationError` with the text for the client.
        """
        sandbox_id = self._unused_id()
        lease: HeldLease | None = None
        if options.enable_sandbox_handoff:
            await notify(Status.SANDBOX_LOCK_ACQUIRING)
            try:
                got = self.leases.try_acquire(sandbox_id)
            except OSError as exc:
                logger.error("sandbox %s: cannot take the lock: %s", sandbox_id, exc)
                got = None
            if not isinstance(got, HeldLease):
                raise CreationError(f"Failed to acquire lock for sandbox {sandbox_id}")
            lease = got
            await notify(Status.SANDBOX_LOCK_ACQUIRED)
        token = secrets.token_hex(32)
        sandbox = self._new_sandbox(sandbox_id, hash_token(token), options)
        try:
            await asyncio.to_thread(self._prepare_new, sandbox)
        except BaseException as exc:
            await asyncio.to_thread(self._remove_directories, sandbox)
            if lease is not None:
                await self._release(lease, notify)
            if isinstance(exc, OSError):
                logger.error("sandbox %s: cannot create: %s", sandbox_id, exc)
                raise CreationError(f"Failed to create sandbox: {exc.strerror or 'OS error'}") from None
            raise
        sandbox.lease = lease
        self.sandboxes[sandbox_id] = sandbox
        logger.info("sandbox %s created", sandbox_id)
        return sandbox, token

    def _prepare_new(self, sandbox: Sandbox) -> None:
        sandbox.directory.mkdir(parents=True)
        self.prepare_bundle(sandbox)
        name = sandbox.options.filesystem_snapshot_name
        if name and not self.storage.load_snapshot(name, sandbox.directory):
            # The name only, never where snapshots live (CV-09).
            raise CreationError(f"Failed to create sandbox: Filesystem snapshot not found: {name}")
        self.isolation.prepare_directory(sandbox.id, sandbox.directory)
        if sandbox.options.enable_checkpoint:
            # Metadata from the start: a later attach then restores, or says the checkpoint is missing (7.2).
            self.storage.write_metadata(sandbox.record(None))

    async def restore(self, sandbox_id: str, token: str, notify: Notify) -> Sandbox:
        """Bring back a sandbox that is not in memory, after ``SANDBOX_RESTORING`` was sent (7.2).

        Returns the sandbox registered under the id (restored here, or by a
        concurrent attach, whose token and use the caller still checks).
        Raises :class:`SandboxNotFoundError`, :class:`PermissionDeniedError`
        or :class:`RestoreError`.
        """
        while (pending := self._restoring.get(sandbox_id)) is not None:
            await asyncio.wait([pending])
        if (sandbox := self.sandboxes.get(sandbox_id)) is not None:
            return sandbox
        done = asyncio.get_running_loop().create_future()
        self._restoring[sandbox_id] = done
        try:
            return await self._restore(sandbox_id, token, notify)
        finally:
            del self._restoring[sandbox_id]
            done.set_result(None)

    async def _read_record(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            return await asyncio.to_thread(self.storage.read_metadata, sandbox_id)
        except MetadataError as exc:
            raise RestoreError(f"Failed to parse or validate metadata for sandbox {sandbox_id}: {exc}") from None

    async def _restore(self, sandbox_id: str, token: str, notify: Notify) -> Sandbox:
        record = await self._read_record(sandbox_id)
        if record is None:
            raise SandboxNotFoundError(sandbox_id)
        # The token before any restore or lock request, so a stranger cannot move a sandbox (S4).
        if not hmac.compare_digest(record.token_sha256, hash_token(token).hex()):
            raise PermissionDeniedError(sandbox_id)
        lease: HeldLease | None = None
        if record.options.enable_sandbox_handoff:
            await notify(Status.SANDBOX_LOCK_ACQUIRING)
            lease = await self._wait_for_lease(sandbox_id)
            await notify(Status.SANDBOX_LOCK_ACQUIRED)
        sandbox: Sandbox | None = None
        try:
            if lease is not None:
                # The previous holder has just written a newer checkpoint.
                record = await self._read_record(sandbox_id)
                if record is None:
                    raise RestoreError(f"Sandbox {sandbox_id} was deleted while waiting for its lock.")
            if record.checkpoint is None:
                raise RestoreError(f"Latest checkpoint not found for sandbox {sandbox_id}")
            sandbox = self._new_sandbox(sandbox_id, bytes.fromhex(record.token_sha256), record.options)
            try:
                found = await asyncio.to_thread(self._restore_files, sandbox, record.checkpoint)
            except OSError as exc:
                logger.error("sandbox %s: cannot restore: %s", sandbox_id, exc)
                raise RestoreError(f"Failed to restore the checkpoint: {exc.strerror or 'OS error'}") from None
            if not found:
                raise RestoreError(f"Latest checkpoint not found for sandbox {sandbox_id}")
        except BaseException:
            if sandbox is not None:
                await asyncio.to_thread(self._remove_directories, sandbox)
            if lease is not None:
                await self._release(lease, notify)
            raise
        sandbox.lease = lease
        self.sandboxes[sandbox_id] = sandbox
        logger.info("sandbox %s restored", sandbox_id)
        return sandbox

    def _restore_files(self, sandbox: Sandbox, checkpoint: str) -> bool:
        sandbox.directory.mkdir(parents=True, exist_ok=True)
        self.prepare_bundle(sandbox)
        found = self.storage.restore_checkpoint(sandbox.id, checkpoint, sandbox.directory)
        self.isolation.prepare_directory(sandbox.id, sandbox.directory)
        return found

    async def _wait_for_lease(self, sandbox_id: str) -> HeldLease:
        """Take the handoff lock, as the one waiter if another instance holds it (7.10)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait_timeout
        waiter: Waiter | None = None
        try:
            while True:
                got = self.leases.try_acquire(sandbox_id)
                if isinstance(got, HeldLease):
                    return got
                if waiter is None:
                    # The holder polls for this file and hands the sandbox over.
                    waiter = self.leases.register_waiter(sandbox_id, self.lock_wait_timeout + 5)
                    if waiter is None:
                        raise RestoreError(f"Lock is held by {got.owner} and already has a waiter.")
                if loop.time() >= deadline:
                    raise RestoreError(f"Timed out waiting for lock release by {got.owner}.")
                await asyncio.sleep(self.lock_poll_interval)
        except OSError as exc:
            logger.error("sandbox %s: lock files: %s", sandbox_id, exc)
            raise RestoreError(f"Failed to acquire lock for sandbox {sandbox_id}") from None
        finally:
            if waiter is not None:
                with contextlib.suppress(OSError):
                    self.leases.remove_waiter(waiter)

    async def _release(self, lease: HeldLease, notify: Notify) -> None:
        await notify(Status.SANDBOX_LOCK_RELEASING)
        try:
            self.leases.release(lease)
        except OSError as exc:
            # It expires on its own; another instance can take over then.
            logger.error("sandbox %s: cannot release the lock: %s", lease.sandbox_id, exc)
        await notify(Status.SANDBOX_LOCK_RELEASED)

    # -- removal -------------------------------------------------------------

    async def delete(self, sandbox: Sandbox, *, forget: bool = False) -> None:
        """Remove a sandbox from this instance, telling its attached connection (7.6, 7.9, 7.13).

        Frames: DELETING, [DONE], [LOCK_RELEASING, LOCK_RELEASED], DELETED.
        ``forget`` (kill_sandbox) also deletes its metadata and checkpoints.
        """
        if sandbox.deleted:
            return
        sandbox.deleted = sandbox.leaving = True
        if self.sandboxes.get(sandbox.id) is sandbox:
            del self.sandboxes[sandbox.id]
        observer = sandbox.observer

        async def tell(status: Status) -> None:
            await _tell(observer, status)

        await tell(Status.SANDBOX_DELETING)
        sandbox.kill_all()
        await sandbox.wait_execution_end()
        if observer is not None:
            await _quietly(observer.wait_stream_end)
        await asyncio.to_thread(self._remove_directories, sandbox)
        if forget:
            await asyncio.to_thread(self.storage.forget, sandbox.id)
        if sandbox.lease is not None:
            lease, sandbox.lease = sandbox.lease, None
            await self._release(lease, tell)
        await tell(Status.SANDBOX_DELETED)
        logger.info("sandbox %s deleted", sandbox.id)

    def _remove_directories(self, sandbox: Sandbox) -> None:
        shutil.rmtree(sandbox.directory, ignore_errors=True)
        shutil.rmtree(sandbox.bundle_dir, ignore_errors=True)

    # -- checkpoints and snapshots -------------------------------------------

    async def _save(self, sandbox: Sandbox) -> None:
        """Persist the sandbox's files as its latest checkpoint; raises OSError.

        Processes cannot be saved without gVisor: they are killed first, so
        that none changes a file while it is copied.
        """
        sandbox.checkpointing = True
        try:
            sandbox.kill_all()
            await sandbox.wait_execution_end()
            await asyncio.to_thread(self._write_checkpoint, sandbox)
        finally:
            sandbox.checkpointing = False

    def _write_checkpoint(self, sandbox: Sandbox) -> None:
        name = self.storage.save_checkpoint(sandbox.id, sandbox.directory)
        # The metadata switch is the commit: until then a restore uses the previous checkpoint.
        self.storage.write_metadata(sandbox.record(name))
        self.storage.prune_checkpoints(sandbox.id, keep=name)

    async def checkpoint(self, sandbox: Sandbox) -> None:
        """Checkpoint and delete; raises :class:`CheckpointError` with upstream's texts (7.7)."""
        if sandbox.deleted or sandbox.leaving:
            raise CheckpointError(f"Sandbox not found: {sandbox.id}")
        if not sandbox.checkpointable:
            raise CheckpointError(f"Sandbox {sandbox.id} is not configured for checkpointing.")
        if sandbox.busy:
            raise CheckpointInProgressError(MSG_CHECKPOINT_IN_PROGRESS)
        sandbox.leaving = True
        try:
            await self._save(sandbox)
        except OSError as exc:
            # S11: the sandbox is kept (without its background processes).
            sandbox.leaving = False
            logger.error("sandbox %s: checkpoint failed: %s", sandbox.id, exc)
            raise CheckpointError(
                f"Failed to checkpoint sandbox {sandbox.id}: {exc.strerror or 'cannot write the checkpoint'}"
            ) from None
        await self.delete(sandbox)
        logger.info("sandbox %s checkpointed", sandbox.id)

    async def snapshot(self, sandbox: Sandbox, name: object) -> None:
        """Snapshot the sandbox's files; raises :class:`SnapshotError` (7.8). May run during an exec."""
        # Storage is checked before the name, as upstream does.
        if not self.snapshots_enabled:
            raise SnapshotError(MSG_SNAPSHOT_DISABLED)
        if not valid_snapshot_name(name):
            raise SnapshotError("Invalid snapshot name: use 1-128 of A-Z a-z 0-9 . _ - not starting with '.'.")
        assert isinstance(name, str)
        if sandbox.deleted:
            raise SnapshotError(f"Sandbox not found: {sandbox.id}")
        try:
            await asyncio.to_thread(self.storage.save_snapshot, name, sandbox.directory)
        except OSError as exc:
            logger.error("sandbox %s: snapshot %s failed: %s", sandbox.id, name, exc)
            raise SnapshotError(f"Failed to store the snapshot: {exc.strerror or 'OS error'}") from None
        logger.info("sandbox %s: snapshot %s written", sandbox.id, name)

    # -- handoff and lock loss -----------------------------------------------

    async def _hand_off(self, sandbox: Sandbox) -> None:
        """Another instance waits for this sandbox: checkpoint it and let the lock go (7.10).

        The old connection is told but not closed (S15).
        """
        observer = sandbox.observer
        logger.info("sandbox %s: another instance asks for it; handing it off", sandbox.id)
        await _tell(observer, Status.SANDBOX_LOCK_RELEASE_REQUESTED)
        await _tell(observer, Status.SANDBOX_CHECKPOINTING)
        sandbox.checkpointing = True  # no exec may start from here on
        ex = sandbox.execution
        if ex is not None and ex.running:
            await _tell(observer, Status.SANDBOX_EXECUTION_FORCE_KILLED)  # before the kill, as upstream
            ex.kill()
            await sandbox.wait_execution_end()
            if observer is not None:
                await _quietly(observer.wait_stream_end)  # its DONE
        try:
            await self._save(sandbox)
        except OSError as exc:
            logger.error("sandbox %s: handoff checkpoint failed: %s", sandbox.id, exc)
            saved = False
        else:
            saved = True
        await self.delete(sandbox)
        # S9: a failed handoff checkpoint is reported as such, not as CHECKPOINTED.
        await _tell(observer, Status.SANDBOX_CHECKPOINTED if saved else Status.SANDBOX_CHECKPOINT_ERROR)

    async def _lose_lock(self, sandbox: Sandbox) -> None:
        logger.warning("sandbox %s: its lock was lost; deleting it here", sandbox.id)
        await _tell(sandbox.observer, Status.SANDBOX_LOCK_RENEWAL_ERROR)
        await self.delete(sandbox)

    async def _keep_leases_forever(self) -> None:
        """Renew this instance's leases and notice waiting instances, by polling the lease files."""
        loop = asyncio.get_running_loop()
        interval = min(self.handoff_poll_interval, self.lease_renewal_interval)
        next_waiter_check = loop.time() + self.handoff_poll_interval
        while True:
            await asyncio.sleep(interval)
            check_waiters = loop.time() >= next_waiter_check
            if check_waiters:
                next_waiter_check = loop.time() + self.handoff_poll_interval
            for sandbox in list(self.sandboxes.values()):
                lease = sandbox.lease
                if lease is None or sandbox.deleted:
                    continue
                try:
                    if check_waiters and not sandbox.leaving and self.leases.has_waiter(sandbox.id):
                        sandbox.leaving = True
                        self.spawn(self._hand_off(sandbox))
                    elif time.time() - lease.renewed_at >= self.lease_renewal_interval:
                        self.leases.renew(lease)
                except LeaseError as exc:
                    logger.warning("sandbox %s: lease renewal failed: %s", sandbox.id, exc)
                    if not sandbox.leaving:
                        sandbox.leaving = True
                        self.spawn(self._lose_lock(sandbox))
                except OSError:
                    logger.exception("sandbox %s: lease files", sandbox.id)  # try again at the next poll

    # -- idle expiry ---------------------------------------------------------

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.idle_sweep_interval)
            now = loop.time()
            for sandbox in list(self.sandboxes.values()):
                try:
                    expired = sandbox.idle_expired(now)
                except Exception:  # one bad sandbox must not stop expiry of the others (7.9's defect)
                    logger.exception("sandbox %s: idle check failed", sandbox.id)
                    continue
                if expired:
                    logger.info("sandbox %s idle for %ss: expiring", sandbox.id, sandbox.options.idle_timeout)
                    sandbox.leaving = True
                    # Its own task: a connection slow to accept frames must not hold up the sweep.
                    self.spawn(self._expire(sandbox))

    async def _expire(self, sandbox: Sandbox) -> None:
        """Idle expiry (7.9): auto-checkpoint if asked for, then the deletion frames only."""
        if sandbox.options.enable_idle_timeout_auto_checkpoint and sandbox.checkpointable:
            try:
                await self._save(sandbox)
            except OSError as exc:
                logger.error("sandbox %s: idle checkpoint failed, deleting it anyway: %s", sandbox.id, exc)
        await self.delete(sandbox)

    def spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                logger.exception("background sandbox task failed")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Kill every process of every sandbox, remove their directories, let the locks go (7.11)."""
        for background in (self._sweeper, self._keeper):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        for task in list(self._tasks):
            task.cancel()
        sandboxes = list(self.sandboxes.values())
        self.sandboxes.clear()
        for sandbox in sandboxes:
            sandbox.deleted = True
            sandbox.kill_all()
        executions = [ex for s in sandboxes if (ex := s.execution) is not None]
        if executions:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_PIPE_GRACE + 2):
                    await asyncio.gather(*(ex.finished.wait() for ex in executions))
            await asyncio.gather(*(ex.wait_stdin_writer() for ex in executions))
        for sandbox in sandboxes:
            if sandbox.options.enable_idle_timeout_auto_checkpoint and sandbox.checkpointable:
                # S10: a sandbox meant to survive idleness survives a restart too.
                try:
                    self._write_checkpoint(sandbox)
                except OSError as exc:
                    logger.error("sandbox %s: checkpoint at shutdown failed: %s", sandbox.id, exc)
            self._remove_directories(sandbox)
            if sandbox.lease is not None:
                with contextlib.suppress(OSError):
                    self.leases.release(sandbox.lease)
        shutil.rmtree(self.instance_dir, ignore_errors=True)


async def _tell(observer: SandboxObserver | None, status: Status) -> None:
    if observer is not None:
        await _quietly(functools.partial(observer.sandbox_status, status))


async def _report(observer: SandboxObserver | None, status: Status, message: str) -> None:
    """An error pair to the attached connection, if any: detached, nobody is told (as for statuses)."""
    if observer is not None:
        await _quietly(functools.partial(observer.sandbox_error, status, message))


async def _quietly(step: Callable[[], Awaitable[None]]) -> None:
    """Run a notification to a connection; a dead connection must not stop a deletion."""
    try:
        await step()
    except Exception:
        logger.debug("notifying a connection failed", exc_info=True)
