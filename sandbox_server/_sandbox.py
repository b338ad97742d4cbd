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
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sandbox_proto import CreateOptions, ProcessPhase, Stream, valid_snapshot_name

__all__ = [
    "CheckpointError",
    "Execution",
    "ExecutionStartError",
    "OutputChunk",
    "OutputLog",
    "Sandbox",
    "SandboxManager",
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

_STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ExecutionStartError(Exception):
    """An exec could not be started; the text is safe to show to the client."""


class CheckpointError(Exception):
    """A checkpoint failed or is not possible; the text follows ``Failed to checkpoint sandbox <ID>: ``."""


class CheckpointInProgressError(CheckpointError):
    """A checkpoint was asked for while an exec runs."""


class SnapshotError(Exception):
    """A snapshot failed; the text follows ``Failed to snapshot filesystem for sandbox <ID>: ``."""


class SandboxObserver(Protocol):
    """The connection attached to a sandbox, as the sandbox's lifecycle sees it."""

    async def sandbox_deleting(self) -> None: ...

    async def wait_stream_end(self) -> None: ...

    async def sandbox_deleted(self) -> None: ...


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

    def __init__(self, sandbox: Sandbox, language: str) -> None:
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
        self._kill_timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    async def start(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.subprocess_exec(
            lambda: _ExecProtocol(self),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
            # Own process group, so a kill reaches everything the exec started (S14).
            start_new_session=True,
        )
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
        # One frame per 1024-byte piece; the incremental decoder carries a split
        # character over to the next piece instead of losing the stream (S2).
        for start in range(0, len(data), READ_SIZE):
            piece = data[start : start + READ_SIZE]
            text = decoder.decode(piece)
            if text:
                self.last_seq = log.append(stream, text, len(piece)).seq
        if log.full:
            self.pause_reading()

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


def _hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Sandbox:
    """One sandbox: a working directory, a code bundle directory, and its executions."""

    def __init__(
        self,
        manager: SandboxManager,
        sandbox_id: str,
        token: str,
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
        self._token_hash = _hash_token(token)
        self.log = OutputLog(manager.output_limit)
        #: The current or most recent exec.
        self.execution: Execution | None = None
        #: Process groups that may still have members (background processes of finished execs).
        self.process_groups: set[int] = set()
        self.observer: SandboxObserver | None = None
        self.deleted = False
        self.last_activity = asyncio.get_running_loop().time()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id}{' deleted' if self.deleted else ''}>"

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(self._token_hash, _hash_token(token))

    def touch(self) -> None:
        """Restart the idle timer (S5: every inbound frame, and the end of an exec)."""
        self.last_activity = asyncio.get_running_loop().time()

    @property
    def busy(self) -> bool:
        return self.execution is not None and self.execution.running

    @property
    def checkpointable(self) -> bool:
        return self.options.enable_checkpoint and self.manager.checkpoint_enabled

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
        return bool(timeout) and not self.deleted and not self.busy and now - self.last_activity > (timeout or 0)

    async def start_exec(self, language: str, code: str) -> Execution:
        if self.deleted:
            raise ExecutionStartError(
                f"Cannot execute code in a sandbox that is not in the RUNNING state (current state: {STOPPED_STATE})"
            )
        if self.busy:
            raise ExecutionStartError("An execution is already in progress.")
        if language == "python":
            script = self.bundle_dir / "main.py"
            argv = [sys.executable, "-u", str(script)]
        else:
            script = self.bundle_dir / "main.sh"
            argv = [self.manager.bash, str(script)]
        # Output of an earlier exec that nobody streamed is given up for good
        # (still replayable by seq until evicted).
        self.log.mark_delivered(self.log.last_seq)
        execution = Execution(self, language)
        try:
            # User code may have removed its own directory; give it a fresh one rather than fail.
            self.directory.mkdir(parents=True, exist_ok=True)
            self.bundle_dir.mkdir(parents=True, exist_ok=True)
            script.write_text(code, encoding="utf-8", errors="surrogatepass")
            await execution.start(argv, self.directory, self.manager.environment(self.directory))
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


def _new_sandbox_id() -> str:
    return "sandbox-" + secrets.token_hex(6)  # 48 random bits (S4)


class SandboxManager:
    """The sandboxes of one server instance, their directories, and the idle sweep."""

    def __init__(
        self,
        state_dir: Path,
        *,
        checkpoint_enabled: bool = False,
        snapshots_enabled: bool = False,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idle_sweep_interval: float = 0.25,
    ) -> None:
        self.state_dir = state_dir
        self.checkpoint_enabled = checkpoint_enabled
        self.snapshots_enabled = snapshots_enabled
        self.output_limit = output_limit
        self.idle_sweep_interval = idle_sweep_interval
        self.sandboxes: dict[str, Sandbox] = {}
        self.bash = shutil.which("bash") or "/bin/bash"
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def bundles_dir(self) -> Path:
        return self.state_dir / "bundles"

    def environment(self, home: Path) -> dict[str, str]:
        # A small, clean environment: nothing of the server's own leaks in.
        return {
            "PATH": os.path.dirname(sys.executable) + os.pathsep + _STANDARD_PATH,
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }

    async def start(self) -> None:
        logger.warning("sandboxes run as plain processes of this user: code is NOT isolated from this machine")
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self.bundles_dir.mkdir(parents=True, exist_ok=True)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sandbox-idle-sweep")

    def create(self, options: CreateOptions) -> tuple[Sandbox, str]:
        """Register a new sandbox; returns it and its token (the only time the token exists in clear)."""
        while True:
            sandbox_id = _new_sandbox_id()
            directory = self.sandboxes_dir / sandbox_id
            # Another instance may share the state directory: its ids are taken too (S13).
            if sandbox_id not in self.sandboxes and not directory.exists():
                break
        bundle = self.bundles_dir / sandbox_id
        directory.mkdir(parents=True)
        bundle.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(32)
        sandbox = Sandbox(self, sandbox_id, token, options, directory, bundle)
        self.sandboxes[sandbox_id] = sandbox
        logger.info("sandbox %s created", sandbox_id)
        return sandbox, token

    def get(self, sandbox_id: str) -> Sandbox | None:
        return self.sandboxes.get(sandbox_id)

    async def delete(self, sandbox: Sandbox) -> None:
        """Remove a sandbox, telling its attached connection (DELETING, [DONE], DELETED)."""
        if sandbox.deleted:
            return
        sandbox.deleted = True
        self.sandboxes.pop(sandbox.id, None)
        observer = sandbox.observer
        if observer is not None:
            await _quietly(observer.sandbox_deleting)
        ex = sandbox.execution
        sandbox.kill_all()
        if ex is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_PIPE_GRACE + 2):
                    await ex.finished.wait()
        if observer is not None:
            await _quietly(observer.wait_stream_end)
        await asyncio.to_thread(self._remove_directories, sandbox)
        if observer is not None:
            await _quietly(observer.sandbox_deleted)
        logger.info("sandbox %s deleted", sandbox.id)

    def _remove_directories(self, sandbox: Sandbox) -> None:
        shutil.rmtree(sandbox.directory, ignore_errors=True)
        shutil.rmtree(sandbox.bundle_dir, ignore_errors=True)

    # -- hooks for checkpoint / snapshot storage (not configured yet) -------

    async def checkpoint(self, sandbox: Sandbox) -> None:
        """Checkpoint and delete; raises :class:`CheckpointError` with upstream's texts (7.7)."""
        if sandbox.deleted:
            raise CheckpointError(f"Sandbox not found: {sandbox.id}")
        if not sandbox.checkpointable:
            raise CheckpointError(f"Sandbox {sandbox.id} is not configured for checkpointing.")
        if sandbox.busy:
            raise CheckpointInProgressError("Cannot checkpoint while an execution is in progress.")
        raise CheckpointError("Checkpoint storage is not implemented by this server.")

    async def snapshot(self, sandbox: Sandbox, name: object) -> None:
        """Snapshot the sandbox's files; raises :class:`SnapshotError` (7.8)."""
        # Storage is checked before the name, as upstream does.
        if not self.snapshots_enabled:
            raise SnapshotError("Filesystem snapshot is not enabled on the server.")
        if not valid_snapshot_name(name):
            raise SnapshotError("Invalid snapshot name: use 1-128 of A-Z a-z 0-9 . _ - not starting with '.'.")
        if sandbox.deleted:
            raise SnapshotError(f"Sandbox not found: {sandbox.id}")
        raise SnapshotError("Snapshot storage is not implemented by this server.")

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
                    logger.info("sandbox %s idle for %ss: deleting", sandbox.id, sandbox.options.idle_timeout)
                    # Its own task: a connection slow to accept frames must not hold up the sweep.
                    self.spawn(self.delete(sandbox))

    def spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Kill every process of every sandbox and remove their directories (7.11)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._tasks):
            task.cancel()
        for sandbox in list(self.sandboxes.values()):
            sandbox.deleted = True
            sandbox.kill_all()
        waits = [ex.finished.wait() for s in self.sandboxes.values() if (ex := s.execution) is not None]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_PIPE_GRACE + 2):
                    await asyncio.gather(*waits)
        for sandbox in list(self.sandboxes.values()):
            self._remove_directories(sandbox)
        self.sandboxes.clear()


async def _quietly(step: Callable[[], Awaitable[None]]) -> None:
    """Run a notification to a connection; a dead connection must not stop a deletion."""
    try:
        await step()
    except Exception:
        logger.debug("notifying a connection failed", exc_info=True)
