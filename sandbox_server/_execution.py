"""One exec: its process, its pipes, its stdin queue, and its frames in the output log.

Each exec is one fresh process in its own process group, whose output is
decoded and appended to the sandbox's :class:`OutputLog`. A connection streams
an execution by reading that log; when nobody reads, the log fills up and the
pipes stop being read (back-pressure, S12) instead of dropping data.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import signal
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox_proto import ExecutionView, Status, Stream

from ._isolation import Command
from ._janitor import is_bwrap
from ._observer import report
from ._output import Signal

if TYPE_CHECKING:
    from ._sandbox import Sandbox

__all__ = ["KILL_PIPE_GRACE", "MERGE_WINDOW", "READ_SIZE", "Execution"]

#: Size of one pipe read, and so the largest output frame (4.3).
READ_SIZE = 1024
#: Longest a read that ends mid-line is held for what the process writes next (seconds).
#: Unbuffered Python writes ``print()``'s text and its newline separately; a read
#: between the two would send the line as two frames (issue 17). Microseconds
#: apart in practice, so 2 ms catches them unless the process is descheduled.
MERGE_WINDOW = 0.002
#: How long a killed exec may keep its pipes open (escaped grandchildren) before we close them.
KILL_PIPE_GRACE = 1.0
#: Stdin an exec may have queued beyond what the rate limit lets through, in seconds of the rate.
STDIN_BACKLOG_SECONDS = 8


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
        #: Host pid of the init of the exec's pid namespace (bwrap only; 0 until bwrap says).
        self.namespace_pid = 0
        self._info = bytearray()
        self._transport: asyncio.SubprocessTransport | None = None
        self._decoders = {
            1: codecs.getincrementaldecoder("utf-8")(errors="replace"),
            2: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self._open_pipes = {1, 2}
        # Bytes read from ``_held_fd`` and not yet framed: less than a piece, not
        # ending a line (see _on_data). Only ever one stream's: a read of the other
        # stream frames them first, so frames keep the order the two were read in.
        self._held = b""
        self._held_fd = 1
        self._held_timer: asyncio.TimerHandle | None = None
        self._exited = False
        self._paused = False
        self._stdin_paused = False
        self._stdin_closed = False
        self._stdin_signal = Signal()
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
        info_read = -1
        if command.piped_args is not None:
            read_end, write_end = os.pipe()
            info_read, info_write = os.pipe()
            os.set_blocking(info_read, False)
            pass_fds = (read_end, info_write)
            try:
                # A few KiB: fits in the pipe buffer, so this cannot block.
                os.write(write_end, b"".join(arg.encode() + b"\0" for arg in command.piped_args))
            finally:
                os.close(write_end)
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: _ExecProtocol(self),
                *command.spawn_argv(*pass_fds) if pass_fds else command.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=command.env,
                pass_fds=pass_fds,
                # Own process group, so a kill reaches everything the exec started (S14).
                start_new_session=True,
            )
        except BaseException:
            if info_read >= 0:
                os.close(info_read)
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)
        self._transport = transport
        self.pid = transport.get_pid()
        self.sandbox.add_process_group(self.pid)
        if info_read >= 0:
            self._info = bytearray()
            loop.add_reader(info_read, self._read_info, info_read)
        if self.sandbox.log.full:
            self.pause_reading()

    def _read_info(self, fd: int) -> None:
        """Collect bwrap's ``--info-fd`` JSON, which names the init of the exec's pid namespace."""
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._info += chunk
            return
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        with contextlib.suppress(ValueError, TypeError, KeyError):
            self.namespace_pid = int(json.loads(self._info)["child-pid"])
            self.sandbox.manager.janitor.track("ns", self.namespace_pid)
            if self.killed:
                self._kill_namespace()  # the kill came before bwrap said who to kill

    def _kill_namespace(self) -> None:
        # Killing the namespace's init kills every process in it, even the ones in
        # another session (bwrap's --new-session) that the process group misses.
        # Not our child: once bwrap is gone its pid could be reused, so check it is still bwrap's init.
        if self.namespace_pid and (not self._exited or is_bwrap(self.namespace_pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.namespace_pid, signal.SIGKILL)

    # -- pipe events -------------------------------------------------------

    def _on_data(self, fd: int, data: bytes) -> None:
        if self.killed:
            return  # upstream discards what is still unread after a kill (7.5)
        if self._output_left >= 0:
            if len(data) > self._output_left:
                data = data[: self._output_left]
                self._output_left = 0
                self.output_exceeded = True
            else:
                self._output_left -= len(data)
        if self._held:
            if self._held_fd == fd:
                data = self._held + data
                self._held = b""
            else:
                self._flush_held()
        # Whole 1024-byte pieces go out now. A shorter rest that ends a line goes
        # too (no delay for line-by-line output); one that ends mid-line is held
        # for MERGE_WINDOW from its first byte (not extended by later reads, so a
        # trickle still comes out every window), to join what the process writes next.
        end = len(data)
        rest = end % READ_SIZE
        if rest and not data.endswith(b"\n") and not self.output_exceeded:
            end -= rest
            self._held, self._held_fd = data[end:], fd
            if self._held_timer is None:
                self._held_timer = asyncio.get_running_loop().call_later(MERGE_WINDOW, self._flush_held)
        elif self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        self._frame(fd, data, end)
        if self.output_exceeded:
            self._end_for_output()
        elif self.sandbox.log.full:
            self.pause_reading()

    def _frame(self, fd: int, data: bytes, end: int) -> None:
        """Append ``data[:end]`` to the log, one frame per 1024-byte piece."""
        decode = self._decoders[fd].decode
        pieces = []
        # The incremental decoder carries a split character over to the next
        # piece instead of losing the stream (S2).
        for start in range(0, end, READ_SIZE):
            piece = data[start : min(start + READ_SIZE, end)]
            text = decode(piece)
            if text:
                pieces.append((text, len(piece)))
        if pieces:
            log = self.sandbox.log
            log.extend("stdout" if fd == 1 else "stderr", pieces)
            self.last_seq = log.last_seq

    def _flush_held(self) -> None:
        """Frame the held bytes now: the window is over, or an event must come after them."""
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        held, self._held = self._held, b""
        if held and not self.killed:
            self._frame(self._held_fd, held, len(held))
            if self.sandbox.log.full:
                self.pause_reading()

    def _end_for_output(self) -> None:
        """The output cap is reached: kill the exec and say why on its stderr, before its DONE."""
        limit = self.sandbox.manager.isolation.limits.output
        self.kill()
        self._note(f"output limit exceeded: the exec wrote more than {limit} bytes and was killed")

    def _note(self, text: str) -> None:
        """A message from the server on the exec's stderr stream."""
        self._flush_held()
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
        self._flush_held()  # what was read before end-of-file, before the decoder's tail
        tail = self._decoders[fd].decode(b"", final=True)
        if tail and not self.killed:
            stream: Stream = "stdout" if fd == 1 else "stderr"
            self.last_seq = self.sandbox.log.append(stream, tail, 0).seq
        self._maybe_finish()

    def _on_exit(self) -> None:
        # Held bytes are not flushed here: the exit can be reported before the
        # last read (the "\n" of a final print()), and flushing would split that
        # line. End-of-file follows the exit, and the window bounds the wait anyway.
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
        if self.namespace_pid:
            self.sandbox.manager.janitor.forget("ns", self.namespace_pid)
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
                await report(
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
        # Output already read stays in the log, the held bytes included; nothing more is read (7.5).
        self._flush_held()
        self.killed = True
        self.resume_reading()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._kill_namespace()
        if self._exited:
            self._arm_kill_timer()


def _stdin_size(data: str) -> int:
    return len(data.encode("utf-8", "surrogatepass"))
