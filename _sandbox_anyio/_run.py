"""``Sandbox.run``: one exec, followed to its end, its whole output collected."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio

from sandbox_proto import EXT_CLOSE_STDIN, RunResult, SandboxProcessError, SandboxStateError, check_exec_arguments

from ._process import SandboxProcess, SandboxStream

if TYPE_CHECKING:
    from ._sandbox import BaseSandbox

logger = logging.getLogger("sandbox")

#: Characters of ``stdin=`` per frame: far below any server's message size limit,
#: even if JSON escapes every one of them (6 bytes each).
STDIN_CHUNK = 2**16


async def run(
    sandbox: BaseSandbox,
    language: str,
    code: str,
    *,
    stdin: str | None,
    timeout: float | None,
    check: bool,
    env: Mapping[str, str] | None,
    cwd: str | None,
) -> RunResult:
    check_exec_arguments(language, code)
    if stdin is not None and not isinstance(stdin, str):
        raise TypeError(f"stdin must be a str, not {type(stdin).__name__}")
    process: SandboxProcess | None = None
    try:
        with sandbox._runtime.deadline(timeout, f"running the {language} code"):
            # No timeout of its own: the deadline covers starting too. If it runs out
            # before the start, exec() withdraws the exec, or kills it once it starts.
            process = await sandbox.exec(language, code, timeout=None, env=env, cwd=cwd)
            stdout, stderr = await _communicate(sandbox, process, stdin)
            exit_code = await process.wait(timeout=None)
    finally:
        if process is not None and not process.done:
            await _kill(process)
    result = RunResult(stdout=stdout, stderr=stderr, exit_code=exit_code)
    if check and exit_code:  # None (unknown) and 0 both pass
        raise SandboxProcessError(_failure_message(language, result), result=result)
    return result


async def _communicate(sandbox: BaseSandbox, process: SandboxProcess, stdin: str | None) -> tuple[str, str]:
    """Feed stdin while reading both streams, like ``subprocess.communicate``.

    Reading one stream to its end before the other would stall: the client
    stops reading the socket once its buffers are full, the server then stops
    sending, and the process blocks writing the stream nobody reads. Feeding
    stdin concurrently matters for the same reason (a process echoing its
    input cannot take more until its output is read).
    """
    stdout: list[str] = []
    stderr: list[str] = []
    async with anyio.create_task_group() as group:
        group.start_soon(_read_all, process.stdout, stdout)
        group.start_soon(_read_all, process.stderr, stderr)
        await _feed(sandbox, process, stdin)
    return "".join(stdout), "".join(stderr)


async def _read_all(stream: SandboxStream, parts: list[str]) -> None:
    # read_all returns at the stream's end even when the process failed: wait() raises that.
    parts.append(await stream.read_all(timeout=None))


async def _feed(sandbox: BaseSandbox, process: SandboxProcess, stdin: str | None) -> None:
    """Write ``stdin``, then close stdin if the server can: nobody else can ever write to it."""
    try:
        data = stdin or ""
        for start in range(0, len(data), STDIN_CHUNK):
            await process.write_to_stdin(data[start : start + STDIN_CHUNK], timeout=None)
        # Closed even without input, so a program reading stdin sees its end instead of
        # waiting for the timeout. Upstream has no way to close it: it stays open.
        if EXT_CLOSE_STDIN in sandbox.extensions:
            await process.close_stdin(timeout=None)
    except SandboxStateError:
        # The process ended without reading all of it (as with subprocess, not an error);
        # or the session ended, which wait() reports.
        logger.debug("stdin of exec %d not fully written: the process has ended", process.exec_id)


async def _kill(process: SandboxProcess) -> None:
    """A run that timed out or was cancelled must not leave its process holding the sandbox."""
    with anyio.CancelScope(shield=True):
        try:
            await process.kill()
        except Exception:
            # The error that stopped the run is the one to report; this one is only logged.
            logger.warning("killing the process of an abandoned run failed", exc_info=True)


def _failure_message(language: str, result: RunResult) -> str:
    code = result.exit_code
    assert code is not None
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    last = result.stderr.strip().rsplit("\n", 1)[-1].strip()
    if len(last) > 200:
        last = last[:200] + "..."
    return f"the {language} process {how}" + (f": {last}" if last else "")
