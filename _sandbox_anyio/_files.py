"""Files in a sandbox, over exec and stdin only, so they work unchanged against the upstream service.

Content travels as base64 lines (stdout and stdin frames are text), one
chunk at a time in each direction: a large file is never held whole twice.
Writes announce their size first, so they need no end-of-file on stdin
(which upstream cannot send). Paths are embedded as Python string literals,
never interpolated into shell code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio

from sandbox_proto import SandboxExecutionError

from ._process import SandboxProcess
from ._runtime import deadline

if TYPE_CHECKING:
    from ._sandbox import BaseSandbox

#: Raw bytes per line: a multiple of 3, so each line is whole base64 on its own.
CHUNK = 3 * 2**16

_WRITE = """
import base64, sys
size = int(sys.stdin.readline())
written = 0
with open({path!r}, "wb") as f:
    while written < size:
        line = sys.stdin.readline()
        if not line:
            sys.exit("input ended after %d of %d bytes" % (written, size))
        chunk = base64.b64decode(line)
        f.write(chunk)
        written += len(chunk)
print("written", written)
"""

_READ = """
import base64, sys
with open({path!r}, "rb") as f:
    while chunk := f.read({chunk}):
        sys.stdout.write(base64.b64encode(chunk).decode() + "\\n")
print("end")
"""

_LIST = """
import json, os
print(json.dumps(sorted(os.listdir({path!r}))))
"""


async def _failure(process: SandboxProcess, what: str) -> SandboxExecutionError:
    """The error of a helper script that did not finish: its last stderr line says why."""
    stderr = await process.stderr.read_all(timeout=5)
    await process.wait(timeout=5)
    reason = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {process.returncode}"
    return SandboxExecutionError(f"{what}: {reason}", server_message=stderr or None)


async def _end(process: SandboxProcess) -> None:
    """A helper abandoned half-way (error, timeout, cancel) must not keep the sandbox busy."""
    if not process.done:
        with anyio.CancelScope(shield=True):
            await process.kill()


async def write_file(sandbox: BaseSandbox, path: str, data: bytes | str, timeout: float | None) -> None:
    content = data.encode() if isinstance(data, str) else data
    process = await sandbox.exec("python", _WRITE.format(path=path), timeout=timeout)
    try:
        with deadline(timeout, f"writing {path}"):
            await process.write_to_stdin(f"{len(content)}\n", timeout=None)
            view = memoryview(content)
            for start in range(0, len(content), CHUNK):
                line = base64.b64encode(view[start : start + CHUNK]).decode() + "\n"
                await process.write_to_stdin(line, timeout=None)
            result = await process.stdout.read_all(timeout=None)
            if result != f"written {len(content)}\n":
                raise await _failure(process, f"cannot write {path}")
            await process.wait(timeout=None)
    finally:
        await _end(process)


async def iter_file(sandbox: BaseSandbox, path: str, timeout: float | None) -> AsyncIterator[bytes]:
    """The file's content in chunks; ``timeout`` bounds each chunk, not the whole file."""
    process = await sandbox.exec("python", _READ.format(path=path, chunk=CHUNK), timeout=timeout)
    try:
        while line := await process.stdout.readline(timeout=timeout):
            if line == "end\n":
                await process.wait(timeout=timeout)
                return
            if not line.endswith("\n"):
                break
            yield base64.b64decode(line)
        raise await _failure(process, f"cannot read {path}")
    finally:
        await _end(process)


async def read_file(sandbox: BaseSandbox, path: str, timeout: float | None) -> bytes:
    content = bytearray()
    with deadline(timeout, f"reading {path}"):
        async for chunk in iter_file(sandbox, path, None):
            content += chunk
    return bytes(content)


async def list_dir(sandbox: BaseSandbox, path: str, timeout: float | None) -> list[str]:
    process = await sandbox.exec("python", _LIST.format(path=path), timeout=timeout)
    try:
        with deadline(timeout, f"listing {path}"):
            output = await process.stdout.read_all(timeout=None)
            try:
                names = json.loads(output)
            except ValueError:
                raise await _failure(process, f"cannot list {path}") from None
            await process.wait(timeout=None)
    finally:
        await _end(process)
    return [str(name) for name in names]
